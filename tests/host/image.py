"""The Debian 12 guest the host tests boot, built once from Debian's packages and cached.

    python3 tests/host/image.py [--cache DIR] [--rebuild]    (root; prints the image's directory)

What is in it: debootstrap bookworm (minbase) with systemd, sshd, sudo, cron, nftables, pam_oath, a
kernel and an initrd, every Depends: of debian/control (so the package installs offline), and the AWS
stand-in: moto in server mode, from a wheelhouse pip downloads here for the guest's Python 3.11,
installed into /opt/moto (moto is no Debian package in bookworm). The guest needs no network at
test time: its only link is qemu's restricted user-mode net, with a port forward to sshd.

The stand-in, aws-standin.service, plays both of EC2's services the broker talks to: it
listens on port 80 of every address, and the unit puts 169.254.169.254 on the loopback first, so the
broker's default IMDS endpoint reaches it as on EC2 (no AWS_EC2_METADATA_SERVICE_ENDPOINT), and a
user's connection to 169.254.169.254 passes the same nftables output hook as on EC2. It starts
before cron, sshd and rolegated, as EC2's IMDS is there from the first instant of a boot. The test
configs name http://127.0.0.1:80 as sts_endpoint. (Its IMDS paths answer on 127.0.0.1 too: a
stand-in's artefact, not what EC2 does; the tests probe 169.254.169.254 only.)

Root logs in over ssh with a key made at build time (id_ed25519 beside the image; no password).

The cache: DIR/guest-KEY/ (default /opt/rolegate-test/guest, beside the test venv, outside the
checkout and outside scripts/sandbox's overlays, so a run inside the sandbox keeps it), where KEY
hashes this file, the package list and the stand-in's requirements; a rerun with the same KEY
reuses it. Built in DIR/.build-KEY-PID and renamed when complete, under a lock: an interrupted
build leaves nothing that looks finished, and the next one removes it. Older keys' images go
once a new one is complete.
"""

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_CACHE = os.environ.get("ROLEGATE_TEST_GUEST_CACHE") or os.path.join(
    os.path.dirname(os.environ.get("ROLEGATE_TEST_VENV") or "/opt/rolegate-test/venv"), "guest")
SUITE = "bookworm"
GUEST_PYTHON = "3.11"  # bookworm's python3
IMAGE_SIZE = "3G"  # sparse; the tree is about 800 MB
# What the tests need besides the package's own dependencies (read from debian/control).
PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "libpam-systemd", "kmod", "iproute2", "procps",
    "openssh-server", "sudo", "cron", "nftables", "libpam-oath", "oathtool",
    "linux-image-amd64", "initramfs-tools",
    "python3", "python3-venv",  # the stand-in's venv
]
# The AWS stand-in, at the version the test venv runs.
STANDIN_REQUIREMENTS = ["moto[server]==5.2.6"]
KERNEL_ARGS = "root=/dev/vda rw console=ttyS0,115200 net.ifnames=0 mitigations=off"

STANDIN_UNIT = """[Unit]
Description=rolegate tests: the AWS stand-in (moto) as IMDS on 169.254.169.254:80 and STS on 127.0.0.1:80
DefaultDependencies=no
After=local-fs.target systemd-sysctl.service
# EC2's IMDS is there from the first instant of a boot: up before anything a user can run starts.
Before=cron.service ssh.service rolegated.service systemd-user-sessions.service multi-user.target

[Service]
Type=simple
ExecStartPre=/bin/sh -c 'ip link set lo up; ip addr replace 169.254.169.254/32 dev lo'
ExecStart=/opt/moto/bin/moto_server -H 0.0.0.0 -p 80
ExecStartPost=/usr/local/sbin/aws-standin-wait
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

# Ready once it answers (bounded: 60 s), so what is ordered after it finds it serving. Then warm:
# moto builds a service's backend on its first request (seconds under TCG), a cost EC2's IMDS and
# STS do not have, which would land on the broker's warm-up or the first login's hook budget. The
# warm-up calls go to 127.0.0.1, so the journal tells them from the broker's (from 169.254.169.254).
WAIT_STANDIN = """#!/opt/moto/bin/python3
import sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        urllib.request.urlopen("http://169.254.169.254:80/moto-api/data.json", timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("the AWS stand-in did not answer on 169.254.169.254:80 within 60 s")
        time.sleep(0.1)
def call(path, method="GET", data=None, headers={}):
    req = urllib.request.Request("http://127.0.0.1:80" + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read().decode()
token = call("/latest/api/token", "PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
role = call("/latest/meta-data/iam/security-credentials/", headers={"X-aws-ec2-metadata-token": token}).split()[0]
call("/latest/meta-data/iam/security-credentials/" + role, headers={"X-aws-ec2-metadata-token": token})
call("/", "POST", b"Action=AssumeRole&Version=2011-06-15&RoleArn=arn:aws:iam::123456789012:role/warm-up"
     b"&RoleSessionName=warm-up", {"Content-Type": "application/x-www-form-urlencoded",
     "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20260101/us-east-1/sts/aws4_request, "
                      "SignedHeaders=host, Signature=0"})
"""

# A small initrd (MODULES=list: only what mounts the root): the kernel unpacks it in a few
# seconds under TCG rather than the default's 35 MB.
INITRAMFS_MODULES = "virtio_pci\nvirtio_blk\next4\n"

NETWORK = """[Match]
Name=eth0

[Network]
# qemu's user-mode net: fixed, so no DHCP wait at boot
Address=10.0.2.15/24
Gateway=10.0.2.2
"""


def control_depends(control=os.path.join(REPO, "debian", "control")):
    """The binary package's Depends: in debian/control, less substitution variables."""
    with open(control) as fh:
        text = fh.read()
    binary = text.split("\nPackage:", 1)[1]
    field = re.search(r"^Depends:(.*?)(?=^\S)", binary, re.M | re.S).group(1)
    names = []
    for item in field.split(","):
        item = item.strip()
        if item and not item.startswith("$"):
            names.append(re.split(r"[\s(|]", item, 1)[0])
    return names


def packages():
    return sorted(set(PACKAGES) | set(control_depends()))


def cache_key():
    digest = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as fh:
        digest.update(fh.read())
    digest.update(json.dumps([packages(), STANDIN_REQUIREMENTS, SUITE]).encode())
    return digest.hexdigest()[:16]


def image_dir(cache=DEFAULT_CACHE):
    return os.path.join(cache, f"guest-{cache_key()}")


def is_built(path):
    return os.path.exists(os.path.join(path, "manifest.json"))


def log(msg):
    print(f"image: {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    """Run a command; on failure, raise with the end of its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd!r} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def in_chroot(root, script):
    """A shell script in the tree, with /proc and /dev mounted in a mount namespace of its own,
    so they go with it even if the build is interrupted."""
    setup = f'set -e; mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; exec chroot "$1" /bin/sh -ec "$2"'
    return sh(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", setup, "chroot", root, script],
              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
              timeout=900)


def pip_command():
    """A pip that can download wheels for the guest: this interpreter's, else the test venv's."""
    for python in (sys.executable, os.path.join(os.environ.get("ROLEGATE_TEST_VENV", "/opt/rolegate-test/venv"),
                                               "bin", "python")):
        if python and subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "pip"]
    raise RuntimeError("no pip to download the AWS stand-in's wheels with: run scripts/test once (it builds the test venv)")


def download_wheels(dest):
    """moto[server] and its dependencies as wheels for the guest's CPython on x86_64 Linux."""
    tags = ["--python-version", GUEST_PYTHON, "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
            "--abi", "none"]
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"):
        tags += ["--platform", platform]
    sh(pip_command() + ["download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "--dest", dest]
       + tags + STANDIN_REQUIREMENTS, timeout=600)


def configure(root, key_pub):
    def write(path, text, mode=0o644):
        full = root + path
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as fh:
            fh.write(text)
        os.chmod(full, mode)

    write("/etc/hostname", "test-guest\n")
    write("/etc/hosts", "127.0.0.1 localhost\n127.0.1.1 test-guest\n::1 localhost ip6-localhost\n")
    write("/etc/fstab", "/dev/vda / ext4 defaults,noatime 0 0\n")
    write("/etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    write("/etc/systemd/network/10-eth0.network", NETWORK)
    write("/etc/systemd/system/aws-standin.service", STANDIN_UNIT)
    write("/usr/local/sbin/aws-standin-wait", WAIT_STANDIN, 0o755)
    # The journal kept across the reboots of one boot of the image (the tests read the last boot's).
    os.makedirs(root + "/var/log/journal", exist_ok=True)
    write("/root/.ssh/authorized_keys", key_pub, 0o600)
    os.chmod(root + "/root/.ssh", 0o700)
    # No DNS lookups of ssh clients' addresses (there is no resolver), quicker logins.
    write("/etc/ssh/sshd_config.d/10-test-guest.conf", "UseDNS no\nPermitRootLogin prohibit-password\n")
    write("/etc/initramfs-tools/conf.d/test-guest.conf", "MODULES=list\n")
    write("/etc/initramfs-tools/modules", INITRAMFS_MODULES)
    in_chroot(root, "systemctl enable systemd-networkd.service aws-standin.service;"
                    " systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer"
                    " e2scrub_reap.service 2>/dev/null || true; passwd -l root >/dev/null;"
                    " update-initramfs -u -k all >/dev/null 2>&1")


def build(cache=DEFAULT_CACHE, rebuild=False):
    """The image directory for this key, built first if it is not in the cache."""
    final = image_dir(cache)
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second caller then reuses it
        if is_built(final) and not rebuild:
            return final
        for name in os.listdir(cache):  # builds an interrupted run left
            if name.startswith(".build-"):
                shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        start = time.monotonic()
        work = os.path.join(cache, f".build-{cache_key()}-{os.getpid()}")
        root = os.path.join(work, "root")
        os.makedirs(root)
        pkgs = packages()
        log(f"building the Debian 12 guest in {work} ({len(pkgs)} packages, about 4 minutes)")
        # In a mount namespace of its own: the /proc and /sys it mounts in the tree go with it.
        sh(["unshare", "--mount", "--propagation", "private", "--", "debootstrap", "--variant=minbase", "--include=" + ",".join(pkgs), SUITE, root],
           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}, timeout=1200)
        log(f"debootstrap done at {time.monotonic() - start:.0f} s")
        wheels = os.path.join(root, "tmp", "wheels")
        download_wheels(wheels)
        in_chroot(root, "python3 -m venv /opt/moto; /opt/moto/bin/pip install --quiet --no-index"
                        " --disable-pip-version-check --find-links /tmp/wheels " + " ".join(f"'{r}'" for r in STANDIN_REQUIREMENTS))
        shutil.rmtree(wheels)
        log(f"the stand-in's venv done at {time.monotonic() - start:.0f} s")
        key = os.path.join(work, "id_ed25519")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test-guest", "-f", key])
        with open(key + ".pub") as fh:
            configure(root, fh.read())
        in_chroot(root, "apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin")
        # Boot with -kernel/-initrd: no bootloader to install or wait for.
        shutil.copy(os.path.join(root, "vmlinuz"), os.path.join(work, "vmlinuz"))
        shutil.copy(os.path.join(root, "initrd.img"), os.path.join(work, "initrd.img"))
        disk = os.path.join(work, "root.img")
        sh(["mkfs.ext4", "-q", "-L", "guest-root", "-E", "root_owner=0:0", "-d", root, disk, IMAGE_SIZE], timeout=600)
        shutil.rmtree(root)
        seconds = time.monotonic() - start
        with open(os.path.join(work, "manifest.json"), "w") as fh:
            json.dump({"suite": SUITE, "packages": pkgs, "standin": STANDIN_REQUIREMENTS, "kernel_args": KERNEL_ARGS,
                       "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(seconds)},
                      fh, indent=1)
        if os.path.exists(final):  # --rebuild
            shutil.rmtree(final)
        os.rename(work, final)
        for name in os.listdir(cache):  # other keys' images: this one replaces them
            if name.startswith("guest-") and os.path.join(cache, name) != final:
                shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        log(f"built {final} in {seconds:.0f} s")
        return final


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--rebuild", action="store_true", help="build again even if this key's image is cached")
    args = parser.parse_args()
    print(build(args.cache, args.rebuild))


if __name__ == "__main__":
    main()

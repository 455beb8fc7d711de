"""A booted Debian 12 guest under qemu, driven over ssh: what tests/host/test_host.py runs on.

By hand (as root; the image is built first if the cache lacks it, about 4 minutes):

    python3 tests/host/guest.py shell            # boot, install this tree's .deb (scripts/build-deb), and
                                                 # print the ssh command; Ctrl-C powers the guest off
    python3 tests/host/guest.py shell --no-deb   # the bare image (then copy in what you want to try)
    python3 tests/host/guest.py shell --deb PATH # another package
    python3 tests/host/guest.py image            # only build (or find) the image; print its directory

In the guest: root over ssh (a key beside the image), systemd 252, the package's dependencies, and
the AWS stand-in (moto) as IMDS on 169.254.169.254:80 and as STS on http://127.0.0.1:80 (see
tests/host/image.py). Every boot starts from the clean image (qemu -snapshot; a reboot inside one
run keeps its changes). To try a unit file: scp it in (the printed command's -i/-P), then
`systemctl daemon-reload && systemctl restart rolegated`; `systemd-analyze security rolegated`.

From Python:

    with Guest(workdir) as g:          # workdir: where the serial log, keys and ssh sockets go
        g.boot()                       # fresh guest; returns once root's ssh answers
        g.root("systemctl is-active rolegated")          # a CompletedProcess; check=True by default
        g.put(local_path, "/root/x.deb")
        g.add_user("alice")            # a user with an ssh key of the test's; g.ssh_cmd("alice", ...)
        g.reboot()                     # and wait for the next boot's sshd
    # leaving the block powers it off, and kills qemu whatever happened

Acceleration: KVM where /dev/kvm can run a guest (ROLEGATE_TEST_ACCEL=kvm|tcg forces one), else
TCG with `-cpu max` (every feature TCG emulates: the guest's Python and OpenSSL pick their fast
paths). Timeouts are generous because TCG on a shared 2-core machine is slow, but bounded.
"""

import argparse
import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import image  # noqa: E402  (tests/host/image.py)

# Measured to sshd: 40-90 s on an idle 2-core machine, 150-170 s with other tests running beside it.
BOOT_TIMEOUT = int(os.environ.get("ROLEGATE_TEST_BOOT_TIMEOUT", "420"))
COMMAND_TIMEOUT = 180
MEMORY_MIB = 2048
CPUS = 2
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=10",
               "-o", "ServerAliveCountMax=6"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerator():
    forced = os.environ.get("ROLEGATE_TEST_ACCEL")
    if forced:
        return forced
    return "kvm" if kvm_works() else "tcg"


def kvm_works():
    """True when /dev/kvm opens and can make a VM (it exists on hosts where it cannot)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        import fcntl
        vm = fcntl.ioctl(fd, 0xAE01, 0)  # KVM_CREATE_VM
        os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _die_with_parent():
    """qemu gets SIGKILL if the test process dies without its finalizer (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


_KVM_FAILED = False


class GuestError(AssertionError):
    pass


class Guest:
    def __init__(self, workdir, image_dir=None, name="guest"):
        self.workdir = workdir
        self.image_dir = image_dir or image.build()
        self.name = name
        self.key = os.path.join(self.image_dir, "id_ed25519")
        self.serial = os.path.join(workdir, f"{name}-serial.log")
        self.control = os.path.join(workdir, f"{name}-ssh-%C")  # root's multiplexed connection
        self.keys = {"root": self.key}
        self.proc = None
        self.port = None
        self.accel = None
        self.boots = []  # seconds from qemu's start (or the reboot command) to root's ssh answering

    # -- life ---------------------------------------------------------------------------------

    def boot(self, timeout=BOOT_TIMEOUT):
        """A fresh guest from the clean image; returns once root's ssh answers."""
        assert self.proc is None, "this guest is running already"
        global _KVM_FAILED
        self.accel = "tcg" if _KVM_FAILED else accelerator()
        start = time.monotonic()
        for attempt in range(4):  # the forward's port is picked free, then bound by qemu: a race
            self.port = free_port()
            self.proc = subprocess.Popen(self.qemu_command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=open(os.path.join(self.workdir, f"{self.name}-qemu.log"), "a"),
                                         preexec_fn=_die_with_parent)
            time.sleep(3)
            if self.proc.poll() is None:
                break
            self.proc = None
            if self.accel == "kvm" and "ROLEGATE_TEST_ACCEL" not in os.environ:
                # /dev/kvm that makes a VM but cannot run this one (nested virtualisation that refuses
                # an MSR, seen here): TCG from now on, for every guest of this process.
                _KVM_FAILED = True
                self.accel = "tcg"
                print(f"guest: KVM failed, using TCG: {self.qemu_log().strip().splitlines()[-1:]}", file=sys.stderr)
            elif "hostfwd" not in self.qemu_log():
                break
        if self.proc is None:
            raise GuestError(f"qemu did not start:\n{self.qemu_log()}")
        self.wait_ssh(start, timeout)
        return self

    def qemu_command(self):
        cpu = ["-cpu", "host"] if self.accel == "kvm" else ["-cpu", "max"]
        accel = "kvm" if self.accel == "kvm" else "tcg,thread=multi"
        return ["qemu-system-x86_64", "-name", self.name, "-machine", "q35", "-accel", accel, *cpu,
                "-smp", str(CPUS), "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config", "-display", "none",
                "-kernel", os.path.join(self.image_dir, "vmlinuz"),
                "-initrd", os.path.join(self.image_dir, "initrd.img"),
                "-append", image.KERNEL_ARGS,
                # snapshot=on: writes go to a temporary file of qemu's, kept across the guest's reboots
                # and gone when qemu ends; the cached image stays clean.
                "-drive", f"file={os.path.join(self.image_dir, 'root.img')},format=raw,if=virtio,snapshot=on",
                # No network but the forward to sshd: restrict=on keeps the guest off every other address.
                "-netdev", f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-device", "virtio-net-pci,netdev=net0",
                "-device", "virtio-rng-pci",  # entropy at boot for sshd and Python
                "-serial", f"file:{self.serial}", "-monitor", "none"]

    def wait_ssh(self, start, timeout, old_boot=None):
        deadline = start + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GuestError(f"qemu exited with {self.proc.returncode} while booting\n{self.qemu_log()}"
                                 f"\nserial console:\n{self.serial_tail()}")
            done = self.root("cat /proc/sys/kernel/random/boot_id", check=False, timeout=30, multiplex=False)
            if done.returncode == 0 and done.stdout.strip() and done.stdout.strip() != old_boot:
                self.boots.append(round(time.monotonic() - start, 1))
                self.wait_user_sessions(deadline)
                return done.stdout.strip()
            time.sleep(2)
        raise GuestError(f"the guest's sshd did not answer within {timeout} s ({self.accel})\n"
                         f"serial console:\n{self.serial_tail()}")

    def wait_user_sessions(self, deadline):
        """Root's ssh answers before users may log in (pam_nologin until systemd-user-sessions.service,
        which waits for what is ordered before it, rolegated among them): wait for that too."""
        state = ""
        while time.monotonic() < deadline:
            state = self.root("systemctl is-active systemd-user-sessions.service", check=False, timeout=60).stdout.strip()
            if state == "active":
                return
            time.sleep(2)
        raise GuestError(f"users may not log in yet (systemd-user-sessions.service is {state!r}) at the boot deadline\n"
                         f"{self.root('systemctl list-jobs --no-pager', check=False, timeout=60).stdout}"
                         f"serial console:\n{self.serial_tail()}")

    def reboot(self, timeout=BOOT_TIMEOUT):
        old = self.boot_id()
        self.close_multiplexed()
        start = time.monotonic()
        self.root("systemctl reboot", check=False, timeout=30, multiplex=False)
        return self.wait_ssh(start, timeout, old_boot=old)

    def boot_id(self):
        return self.root("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def poweroff(self, timeout=90):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.close_multiplexed()
            self.root("systemctl poweroff", check=False, timeout=30, multiplex=False)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self):
        """Always safe: qemu ends here if it has not already."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.poweroff()
        finally:
            self.kill()

    # -- commands -------------------------------------------------------------------------------

    def ssh_cmd(self, user="root", command=None, tty=False, multiplex=False):
        cmd = ["ssh", "-i", self.keys[user], "-p", str(self.port), *SSH_OPTIONS, "-tt" if tty else "-T"]
        if multiplex:  # root's commands share one connection: ~1.4 s saved each under TCG
            cmd += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control}", "-o", "ControlPersist=120"]
        cmd.append(f"{user}@127.0.0.1")
        if command is not None:
            cmd.append(command)
        return cmd

    def root(self, script, check=True, timeout=COMMAND_TIMEOUT, input=None, multiplex=True):
        """Run a shell script as root in the guest; a CompletedProcess (text). ssh's own failure
        (exit 255: the connection, not the script) is tried twice more over a fresh connection."""
        for attempt in range(3):
            done = self.run(self.ssh_cmd("root", script, multiplex=multiplex), False, timeout, input, f"root: {script}")
            if done.returncode != 255 or not multiplex:
                break
            self.close_multiplexed()
            time.sleep(2)
        if check and done.returncode != 0:
            raise GuestError(f"root: {script!r} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def login(self, user, script, check=False, timeout=COMMAND_TIMEOUT, input=None):
        """A fresh ssh login of `user` (a PAM session of its own) running `script`."""
        return self.run(self.ssh_cmd(user, script), check, timeout, input, f"{user}: {script}")

    def run(self, cmd, check, timeout, input, what):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise GuestError(f"{what!r} did not finish within {timeout} s: {err.stdout!r} {err.stderr!r}\n"
                             f"serial console:\n{self.serial_tail(30)}") from None
        if check and done.returncode != 0:
            raise GuestError(f"{what!r} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}")
        return done

    def write(self, path, text, mode="0644", owner="root:root"):
        """A file in the guest with this content."""
        q = shlex.quote(path)
        self.root(f"mkdir -p $(dirname {q}) && cat > {q} && chmod {mode} {q} && chown {owner} {q}", input=text)

    def put(self, local, remote):
        """Copy a file into the guest: its bytes through root's ssh connection (`cat >`), which
        needs nothing of the guest's sftp server."""
        with open(local, "rb") as fh:
            done = subprocess.run(self.ssh_cmd("root", f"cat > {shlex.quote(remote)}", multiplex=True), stdin=fh,
                                  capture_output=True, timeout=COMMAND_TIMEOUT)
        if done.returncode != 0:
            raise GuestError(f"copying {local} to the guest's {remote} failed ({done.returncode}): "
                             f"{done.stderr.decode(errors='replace')}")

    def add_user(self, name, groups=(), password=None):
        """A user in the guest who logs in over ssh with a key of the test's."""
        key = os.path.join(self.workdir, f"id_{name}")
        if not os.path.exists(key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        with open(key + ".pub") as fh:
            pub = fh.read()
        make = f"id {name} >/dev/null 2>&1 || useradd -m -s /bin/bash {name}"
        for g in groups:
            make = f"(getent group {g} >/dev/null || groupadd {g}); " + make + f"; usermod -aG {g} {name}"
        self.root(make)
        self.write(f"/home/{name}/.ssh/authorized_keys", pub, "0600", f"{name}:{name}")
        self.root(f"chown {name}: /home/{name}/.ssh && chmod 700 /home/{name}/.ssh")
        if password is not None:
            self.root("chpasswd", input=f"{name}:{password}\n")
        self.keys[name] = key

    def close_multiplexed(self):
        subprocess.run(self.ssh_cmd("root", multiplex=True)[:-1] + ["-O", "exit", "root@127.0.0.1"],
                       capture_output=True, timeout=10)

    # -- what went on ---------------------------------------------------------------------------

    def serial_tail(self, lines=60):
        """The end of the serial console, without colours and systemd's "job running" spinner."""
        try:
            with open(self.serial, errors="replace") as fh:
                text = fh.read()
        except FileNotFoundError:
            return "(no serial log)"
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", text)
        kept = [l for l in text.splitlines() if l.strip() and not re.search(r"\) Job .* running \(", l)]
        return "\n".join(kept[-lines:]) + "\n"

    def qemu_log(self):
        try:
            with open(os.path.join(self.workdir, f"{self.name}-qemu.log")) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""


def build_deb(out):
    """This tree's package, by its scripts/build-deb (lintian's verdict is tests/test_deb.py's business)."""
    done = subprocess.run([os.path.join(REPO, "scripts", "build-deb"), "--out", out], capture_output=True,
                          text=True, timeout=900)
    debs = [f for f in os.listdir(out) if f.startswith("rolegate_") and f.endswith("_all.deb")] \
        if os.path.isdir(out) else []
    if len(debs) != 1:
        raise GuestError(f"scripts/build-deb made no package:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return os.path.join(out, debs[0])


def install_deb(guest, path):
    """dpkg -i in the guest (install or upgrade): its dependencies are in the image, so this needs
    no network."""
    remote = "/root/" + os.path.basename(path)
    guest.put(path, remote)
    # --force-confold: as an unattended upgrade runs, keeping the admin's edited conffiles (the
    # example config changes between releases) instead of stopping at dpkg's prompt.
    return guest.root(f"DEBIAN_FRONTEND=noninteractive dpkg --force-confdef --force-confold -i {remote}",
                      check=False, timeout=300)


def main():
    parser = argparse.ArgumentParser(description="Boot the host tests' Debian 12 guest by hand.")
    sub = parser.add_subparsers(dest="command", required=True)
    shell = sub.add_parser("shell", help="boot a guest (with this tree's package) and print the ssh command")
    shell.add_argument("--deb", help="install this .deb instead of building the tree's")
    shell.add_argument("--no-deb", action="store_true", help="install no package")
    sub.add_parser("image", help="build or find the image; print its directory")
    args = parser.parse_args()
    if os.getuid() != 0:
        sys.exit("guest.py: run as root (debootstrap and the image cache need it)")
    if args.command == "image":
        print(image.build())
        return
    workdir = tempfile.mkdtemp(prefix="rolegate-guest-")
    deb = None
    if not args.no_deb:
        deb = args.deb or build_deb(os.path.join(workdir, "dist"))
    with Guest(workdir) as guest:
        start = time.monotonic()
        guest.boot()
        print(f"booted ({guest.accel}) in {time.monotonic() - start:.0f} s", file=sys.stderr)
        if deb:
            done = install_deb(guest, deb)
            print(done.stdout + done.stderr, file=sys.stderr)
        print("\n" + shlex.join(guest.ssh_cmd("root")))
        print(f"copy in: scp -i {guest.key} -P {guest.port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
              " FILE root@127.0.0.1:", file=sys.stderr)
        print(f"serial console log: {guest.serial}\nCtrl-C powers the guest off.", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            while guest.proc.poll() is None:
                time.sleep(1)


if __name__ == "__main__":
    main()

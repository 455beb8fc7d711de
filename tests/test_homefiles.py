"""backends/homefiles.py: the broker's read of a user's ~/.aws/config, against real files, links,
FIFOs, device nodes and homes of a real account (inside the sandbox: users and /etc are its own)."""

import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

from conftest import require_sandbox
from harness import run
from pam_rolegate.backends import homefiles
from pam_rolegate.backends.homefiles import AWS_CONFIG, MAX_CONFIG_BYTES, Unreadable
from pam_rolegate.rules import awsconfig

USER, OTHER = "rgdora", "rgedgar"
SECRET_REGION = "eu-west-3"  # in root-only files the user must never learn anything about


@pytest.fixture(scope="module")
def account():
    require_sandbox()
    for name in (USER, OTHER):
        if run(["id", name], check=False).returncode != 0:
            run(["useradd", "-m", "-s", "/bin/bash", name])
    import pwd

    pw = pwd.getpwnam(USER)
    yield pw
    set_home(USER, pw.pw_dir)


def set_home(name, home):
    """The account's home in the sandbox's own /etc/passwd. Not usermod: it refuses while any process
    of the uid runs, and /proc here also shows other sandboxes' users of the same uid."""
    with open("/etc/passwd") as fh:
        lines = fh.read().splitlines(keepends=True)
    with open("/etc/passwd", "w") as fh:
        for line in lines:
            fields = line.split(":")
            if fields[0] == name:
                fields[5] = home
            fh.write(":".join(fields))


def remove(path):
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home(account):
    """The account's home with an empty ~/.aws (theirs), emptied again afterwards."""
    aws = os.path.join(account.pw_dir, ".aws")
    remove(aws)
    os.mkdir(aws, 0o755)
    os.chown(aws, account.pw_uid, account.pw_gid)
    yield account
    remove(aws)
    set_home(USER, account.pw_dir)


def put(pw, text, mode=0o600, owner=None):
    path = os.path.join(pw.pw_dir, *AWS_CONFIG)
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    uid = pw.pw_uid if owner is None else owner
    os.chown(path, uid, uid if uid == 0 else pw.pw_gid)
    return path


def secret_file(tmpdir="/root"):
    path = os.path.join(tmpdir, "rg-secret-config")
    with open(path, "w") as fh:
        fh.write(f"[default]\nregion = {SECRET_REGION}\n")
    os.chmod(path, 0o600)
    return path


def refused(pw, expect):
    with pytest.raises(Unreadable) as caught:
        homefiles.read_user_file(pw.pw_uid, AWS_CONFIG)
    assert expect in str(caught.value), f"refused for the wrong reason: {caught.value}"
    assert SECRET_REGION not in str(caught.value), f"the reason leaks the file: {caught.value}"
    return caught.value


def test_homefiles__reads_the_users_own_config(home):
    put(home, "[default]\nregion = eu-west-2\n")
    data = homefiles.read_user_file(home.pw_uid, AWS_CONFIG)
    assert awsconfig.names_region(data.decode()), f"the user's own region was not read: {data!r}"


def test_homefiles__a_missing_file_is_quietly_no_region(home):
    err = refused(home, "no ")
    assert err.quiet, "a missing ~/.aws/config is ordinary and must not be logged"


def test_homefiles__a_symlinked_config_is_not_followed(home):
    target = secret_file()
    os.symlink(target, os.path.join(home.pw_dir, *AWS_CONFIG))
    refused(home, "symlink")


def test_homefiles__a_symlinked_aws_directory_is_not_followed(home):
    shutil.rmtree(os.path.join(home.pw_dir, ".aws"))
    os.makedirs("/root/rg-dotaws", exist_ok=True)
    shutil.copy(secret_file(), "/root/rg-dotaws/config")
    os.symlink("/root/rg-dotaws", os.path.join(home.pw_dir, ".aws"))
    refused(home, "symlink")


def test_homefiles__a_fifo_neither_blocks_nor_is_read(home):
    os.mkfifo(os.path.join(home.pw_dir, *AWS_CONFIG))
    os.chown(os.path.join(home.pw_dir, *AWS_CONFIG), home.pw_uid, home.pw_gid)
    started = time.monotonic()
    refused(home, "not a regular file")
    assert time.monotonic() - started < 1, "a FIFO held the read"


def test_homefiles__a_device_node_is_never_opened(home):
    os.mknod(os.path.join(home.pw_dir, *AWS_CONFIG), 0o666 | 0o020000, os.makedev(1, 5))  # /dev/zero
    refused(home, "not a regular file")


def test_homefiles__an_oversized_config_is_refused_unread(home):
    put(home, "[default]\nregion = eu-west-2\n" + "#" * MAX_CONFIG_BYTES)
    refused(home, f"larger than {MAX_CONFIG_BYTES} bytes")
    put(home, "[default]\nregion = eu-west-2\n" + "#" * (MAX_CONFIG_BYTES - 40))
    assert homefiles.read_user_file(home.pw_uid, AWS_CONFIG), "a config just under the bound should be read"


def test_homefiles__a_file_of_another_user_is_refused(home, account):
    import pwd

    put(home, "[default]\nregion = eu-west-2\n", mode=0o644, owner=pwd.getpwnam(OTHER).pw_uid)
    refused(home, "not owned by the user or root")


def test_homefiles__the_read_has_the_users_rights_not_roots(home):
    # root's own file in the user's directory: root could read it, the user cannot, nor may the broker
    put(home, f"[default]\nregion = {SECRET_REGION}\n", mode=0o600, owner=0)
    err = refused(home, "permission denied")
    assert err.quiet
    put(home, "[default]\nregion = eu-west-2\n", mode=0o644, owner=0)  # an administrator's, readable
    assert b"eu-west-2" in homefiles.read_user_file(home.pw_uid, AWS_CONFIG), "a root-owned 0644 config is the user's"
    status = open("/proc/thread-self/status").read()
    assert "\nUid:\t0\t0\t0\t0\n" in status, f"the caller's thread must keep root's identity: {status}"


def test_homefiles__a_home_reached_through_roots_link_is_read(home):
    # /home -> /data/home on some hosts: a link root placed in a directory only root may write
    link = "/rg-homes-link"
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.dirname(home.pw_dir), link)
    try:
        set_home(USER, os.path.join(link, os.path.basename(home.pw_dir)))
        put(home, "[default]\nregion = eu-west-2\n")
        assert b"eu-west-2" in homefiles.read_user_file(home.pw_uid, AWS_CONFIG), "root's link in the home path"
    finally:
        os.unlink(link)


def test_homefiles__a_home_path_through_a_users_link_is_refused(home):
    # a link the user made (in their own directory), and a root-owned link in a directory others may write
    own = os.path.join(home.pw_dir, "elsewhere")
    os.symlink("/root", own)
    os.lchown(own, home.pw_uid, home.pw_gid)
    tmp_link = "/tmp/rg-home-link"
    if os.path.lexists(tmp_link):
        os.unlink(tmp_link)
    os.symlink(home.pw_dir, tmp_link)
    try:
        for path in (own, tmp_link):
            set_home(USER, path)
            refused(home, "a link root did not place")
    finally:
        os.unlink(own)
        os.unlink(tmp_link)


def test_homefiles__a_home_owned_by_someone_else_is_refused(home):
    set_home(USER, "/root")
    refused(home, "not owned by the user")


def test_homefiles__a_stuck_read_costs_the_login_its_budget_at_most():
    # A fake read stands for a dead NFS server (the kernel's part cannot be had here); what is
    # tested is the pool's logic: the wait is bounded, stuck readers do not pile up, and once every
    # reader is stuck later logins skip the read at once instead of each waiting out its budget.
    import threading

    release = threading.Event()

    def stuck(uid, parts, limit):
        release.wait(10)
        return b""

    def at_once(match, what):
        started = time.monotonic()
        with pytest.raises(Unreadable, match=match):
            reader.read(1000, timeout=5)
        # At once, against the 5 s it was allowed: 1 s is a no-hang bound a loaded machine keeps.
        assert time.monotonic() - started < 1.0, f"{what}: a login must skip the read at once, not wait its budget"

    reader = homefiles.HomeReader(readers=2, max_waiting=3, read=stuck)
    try:
        started = time.monotonic()
        with pytest.raises(Unreadable, match="longer than"):
            reader.read(1000, timeout=0.1)  # holds reader 1, past its budget
        assert time.monotonic() - started < 2.0, "the wait outlived its 0.1 s budget (the read is stuck for 10 s)"
        waits = [threading.Thread(target=lambda: pytest.raises(Unreadable, reader.read, 1000, timeout=1.0))
                 for _ in range(2)]  # the second on reader 2, the third queued behind them
        for w in waits:
            w.start()
        # Both must be inside read() (one reading, one queued) before the cap is tried; a fixed
        # sleep would not know when a loaded machine got round to starting them.
        deadline = time.monotonic() + 5
        while reader._waiting < 3:
            assert time.monotonic() < deadline, f"the two reads never reached the reader: {reader._waiting} pending"
            time.sleep(0.01)
        at_once("too many reads", "past the waiting cap")
        for w in waits:
            w.join(5)
        at_once("readers are stuck", "with every reader stuck")
        release.set()
        deadline = time.monotonic() + 5
        while True:  # the stuck reads finish on their own and give their readers back
            try:
                assert reader.read(1000, timeout=2) == b"", "a read after the stuck ones ended returned the wrong bytes"
                break
            except Unreadable:
                assert time.monotonic() < deadline, "reads never worked again after the stuck ones ended"
                time.sleep(0.05)
    finally:
        release.set()
        reader.close()


def test_homefiles__a_stuck_read_does_not_hold_the_brokers_exit():
    """The readers are daemon threads: a stop must not wait for a home that never answers."""
    code = ("import threading, sys\nfrom pam_rolegate.backends import homefiles\n"
            "r = homefiles.HomeReader(readers=1, read=lambda *a: threading.Event().wait())\n"
            "try:\n    r.read(1000, timeout=0.1)\nexcept homefiles.Unreadable:\n    pass\n"
            "r.close()\nprint('closed', flush=True)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    assert done.returncode == 0 and "closed" in done.stdout, f"the test process failed: {done.stderr}"
    assert took < 5, f"the process took {took:.1f}s to exit with a read stuck: the reader held its exit"


def test_homefiles__the_cost_of_the_read_at_a_login(home):
    """Measured, not asserted beyond 'no hang': read + parse of a typical config through the pool."""
    put(home, "[default]\nregion = eu-west-2\noutput = json\n"
              + "".join(f"[profile p{i}]\nrole_arn = arn:aws:iam::123456789012:role/r{i}\nsource_profile = default\n"
                        for i in range(20)))
    reader = homefiles.HomeReader()
    try:
        samples = []
        for _ in range(300):
            started = time.perf_counter()
            data = reader.read(home.pw_uid)
            assert awsconfig.names_region(data.decode())
            samples.append(time.perf_counter() - started)
        samples.sort()
        p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99)]
        print(f"\nown-region check at a login (pool handoff, NSS, fs identity, walk, read, parse of "
              f"{len(data)} bytes): p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
        # The median, not the p99: a few samples on a shared machine may meet a scheduling stall.
        assert p50 < homefiles.READ_BUDGET, f"the read of a local file should fit its budget: p50 {p50:.3f} s"
    finally:
        reader.close()


# -- the stat cache: a login whose ~/.aws/config has not changed is not read again ----------------
SETTLE = 0.2  # the tests' settle time: longer than a timestamp tick, short enough to wait out


def settled_reader():
    return homefiles.HomeReader(readers=1, cache=homefiles.StatCache(settle=SETTLE))


def read_through(reader, pw):
    return reader.read(pw.pw_uid, timeout=5)


def test_homefiles__an_unchanged_config_is_served_from_the_cache(home):
    put(home, "[default]\nregion = eu-west-2\n")
    time.sleep(SETTLE + 0.1)
    reader = settled_reader()
    try:
        first = read_through(reader, home)
        assert reader.cache.misses == 1 and reader.cache.hits == 0, "the first read must read the file"
        second = read_through(reader, home)
        assert second == first, f"the cache answered other bytes: {second!r}"
        assert reader.cache.hits == 1, f"an unchanged file was read again (hits {reader.cache.hits})"
    finally:
        reader.close()


def test_homefiles__a_config_changed_within_the_settle_time_is_not_kept(home):
    put(home, "[default]\nregion = eu-west-2\n")  # just written: its times may share a tick with the next write
    reader = settled_reader()
    try:
        read_through(reader, home)
        read_through(reader, home)
        assert reader.cache.hits == 0, "a file written within the settle time was served from the cache"
    finally:
        reader.close()


def test_homefiles__same_size_new_content_and_a_touched_mtime_is_read_again(home):
    path = put(home, "[default]\nregion = eu-west-2\n")
    time.sleep(SETTLE + 0.1)
    reader = settled_reader()
    try:
        assert b"eu-west-2" in read_through(reader, home)
        before = os.stat(path)
        with open(path, "r+") as fh:  # same size, same inode, mtime set back: only the ctime tells
            fh.write("[default]\nregion = eu-west-1\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
        assert b"eu-west-1" in read_through(reader, home), "a changed file was answered from the cache"
    finally:
        reader.close()


def test_homefiles__a_cached_config_swapped_for_a_symlink_is_refused(home):
    path = put(home, f"[default]\nregion = eu-west-2\n")
    time.sleep(SETTLE + 0.1)
    reader = settled_reader()
    try:
        read_through(reader, home)
        target = secret_file()
        os.unlink(path)
        os.symlink(target, path)
        with pytest.raises(Unreadable, match="symlink") as caught:
            read_through(reader, home)
        assert SECRET_REGION not in str(caught.value)
        # the .aws directory swapped for a link to a copy of the old one: refused too
        os.unlink(path)
        put(home, "[default]\nregion = eu-west-2\n")
        time.sleep(SETTLE + 0.1)
        assert b"eu-west-2" in read_through(reader, home), "the restored config should be read"
        aws = os.path.join(home.pw_dir, ".aws")
        moved = os.path.join(home.pw_dir, ".aws-moved")  # the same filesystem: the inodes are the cached ones
        os.rename(aws, moved)
        os.symlink(moved, aws)
        with pytest.raises(Unreadable, match="symlink"):
            read_through(reader, home)
    finally:
        reader.close()
        remove(os.path.join(home.pw_dir, ".aws-moved"))


def test_homefiles__a_cached_config_the_user_may_no_longer_read_is_refused(home):
    path = put(home, "[default]\nregion = eu-west-2\n", mode=0o644, owner=0)  # an administrator's, readable
    time.sleep(SETTLE + 0.1)
    reader = settled_reader()
    try:
        assert b"eu-west-2" in read_through(reader, home)
        os.chmod(path, 0o600)  # now root's alone: the kept bytes must not outlive the user's right to them
        with pytest.raises(Unreadable, match="permission denied"):
            read_through(reader, home)
    finally:
        reader.close()

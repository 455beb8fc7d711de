"""The credential store on a real tmpfs: modes, owners, atomic replacement, planted links not followed."""

import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
import threading
from datetime import datetime, timezone

import pytest

from conftest import require_sandbox
from pam_rolegate.backends import store
from pam_rolegate.errors import StoreError
from pam_rolegate.backends.sts import Credentials

NOBODY = 65534


@pytest.fixture
def runtime_dir():
    if os.getuid() != 0:
        pytest.skip("the store chowns files: run as root (sudo scripts/test)")
    # Under /run, not /dev/shm or /tmp: a world-writable parent (even a sticky one) is refused.
    path = tempfile.mkdtemp(prefix="rolegate-test-", dir="/run")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def creds(n=1):
    return Credentials(f"ASIA{n:016d}", f"secret{n}", f"token{n}", datetime(2030, 1, 1, tzinfo=timezone.utc))


def test_store__file_is_0600_owned_by_user_in_root_only_directories(runtime_dir):
    s = store.CredentialStore(runtime_dir, mount=False)
    s.prepare()
    path = s.write("g1", store.CREDENTIALS, store.credentials_ini(creds()), NOBODY, NOBODY)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, f"mode {stat.S_IMODE(st.st_mode):o}"
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), f"owner {st.st_uid}:{st.st_gid}"
    d = os.path.dirname(path)
    while True:
        dst = os.lstat(d)
        assert dst.st_uid == 0 and not dst.st_mode & 0o022, f"{d} must be root-owned and not group/other-writable"
        if d == runtime_dir:
            break
        d = os.path.dirname(d)
    assert store.fs_type(path) == "tmpfs", "credentials must live on tmpfs"
    text = open(path).read()
    assert "[default]" in text and "aws_secret_access_key = secret1" in text, text


def test_store__refuses_a_runtime_dir_not_on_tmpfs():
    # In our own tree: on disk, and (unlike /tmp) its parents are root-only.
    disk = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        with pytest.raises(StoreError, match="not tmpfs"):
            store.CredentialStore(disk, mount=False).prepare()
    finally:
        shutil.rmtree(disk, ignore_errors=True)


def test_store__mounts_a_tmpfs_when_allowed():
    require_sandbox()  # the mount is private to the sandbox's namespace
    disk = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)))  # on disk, in our own tree
    try:
        s = store.CredentialStore(disk, mount=True)
        s.prepare()
        assert store.fs_type(disk) == "tmpfs", f"{disk} should now be a tmpfs mount"
    finally:
        subprocess.run(["umount", disk], check=False)
        shutil.rmtree(disk, ignore_errors=True)


def test_store__refuses_a_world_writable_or_symlinked_runtime_dir(runtime_dir):
    os.chmod(runtime_dir, 0o777)
    with pytest.raises(StoreError, match="writable by group or others"):
        store.CredentialStore(runtime_dir, mount=False).prepare()
    os.chmod(runtime_dir, 0o755)
    link = runtime_dir + ".link"
    os.symlink(runtime_dir, link)
    try:
        with pytest.raises(StoreError, match="symbolic link"):
            store.CredentialStore(link, mount=False).prepare()
    finally:
        os.unlink(link)


@pytest.mark.parametrize("holder_mode", [0o755, 0o777], ids=["root-only", "world-writable"])
def test_store__refuses_a_runtime_dir_below_a_symlinked_parent(runtime_dir, holder_mode):
    # A user's directory, reached through a link planted in a parent of runtime_dir.
    target = runtime_dir + ".target"
    os.mkdir(target, 0o755)
    os.chown(target, NOBODY, NOBODY)
    link = os.path.join(runtime_dir, "link")
    os.symlink(target, link)
    os.chmod(runtime_dir, holder_mode)
    try:
        with pytest.raises(StoreError) as err:
            store.CredentialStore(os.path.join(link, "rolegate"), mount=False).prepare()
        # The first unsafe component is the one named: the link, or the writable dir holding it.
        culprit = link if holder_mode == 0o755 else runtime_dir
        assert f"{culprit} is" in str(err.value), f"the error should name {culprit}: {err.value}"
        assert "choose a directory under /run" in str(err.value), f"the error should say what to do: {err.value}"
        assert os.listdir(target) == [], f"something was created through the link: {os.listdir(target)}"
    finally:
        shutil.rmtree(target, ignore_errors=True)


@pytest.mark.parametrize("mode,owner", [(0o777, 0), (0o1777, 0), (0o775, 0), (0o755, NOBODY)],
                         ids=["0777", "sticky-1777", "group-0775", "nobody-owned"])
def test_store__refuses_a_parent_others_can_write(runtime_dir, mode, owner):
    os.chmod(runtime_dir, mode)
    os.chown(runtime_dir, owner, owner)
    with pytest.raises(StoreError) as err:
        store.CredentialStore(os.path.join(runtime_dir, "rolegate"), mount=False).prepare()
    problem = "owned by uid" if owner else "writable by group or others"
    assert f"{runtime_dir} is" in str(err.value) and problem in str(err.value), \
        f"mode {mode:o} uid {owner}: the error should name {runtime_dir} and say it is {problem}: {err.value}"
    assert os.listdir(runtime_dir) == [], f"something was created below a refused parent: {os.listdir(runtime_dir)}"


def test_store__creates_missing_components_below_a_safe_parent(runtime_dir):
    path = os.path.join(runtime_dir, "a", "b", "rolegate")
    old_umask = os.umask(0o077)  # a strict umask must not leave the socket directory unreachable
    try:
        s = store.CredentialStore(path, mount=False)
        s.prepare()
    finally:
        os.umask(old_umask)
    for d in (os.path.join(runtime_dir, "a"), os.path.join(runtime_dir, "a", "b"), path):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755, \
            f"{d} should be a root-owned 0755 directory, is uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):o}"
    written = s.write("g1", store.CREDENTIALS, b"x\n", NOBODY, NOBODY)
    assert open(written, "rb").read() == b"x\n", f"the store under a created path did not work: {written}"


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_store__planted_entry_at_credential_path_is_not_followed(runtime_dir, plant):
    s = store.CredentialStore(runtime_dir, mount=False)
    s.prepare()
    s.write("g1", store.CREDENTIALS, b"old\n", NOBODY, NOBODY)
    # Outside runtime_dir but on the same filesystem, so a hard link is possible.
    outside = pathlib.Path(runtime_dir + ".victim")
    outside.write_text("precious\n")
    os.chmod(outside, 0o644)
    target = s.path("g1")
    os.unlink(target)
    if plant == "symlink":
        os.symlink(outside, target)
    elif plant == "hardlink":
        os.link(outside, target)
    else:
        os.mkfifo(target)
    s.write("g1", store.CREDENTIALS, store.credentials_ini(creds()), NOBODY, NOBODY)
    assert outside.read_text() == "precious\n", "a root write went through a planted link to a file outside"
    st_out = os.stat(outside)
    assert (st_out.st_uid, stat.S_IMODE(st_out.st_mode)) == (0, 0o644), "the outside file's owner/mode changed"
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, f"{plant} should have been replaced by a fresh file"
    assert s.remove("g1") and not os.path.exists(os.path.dirname(target)), "grant directory should be removed"
    assert outside.read_text() == "precious\n", "removal touched the outside file"
    outside.unlink()


def test_store__planted_symlink_at_grant_directory_is_replaced(runtime_dir, tmp_path):
    s = store.CredentialStore(runtime_dir, mount=False)
    s.prepare()
    os.symlink(tmp_path, os.path.join(runtime_dir, store.GRANTS, "g2"))
    s.write("g2", store.CREDENTIALS, b"x\n", NOBODY, NOBODY)
    assert os.listdir(tmp_path) == [], "a file was written through a symlinked grant directory"
    assert not os.path.islink(os.path.dirname(s.path("g2"))), "the planted symlink should be gone"


def test_store__concurrent_reader_never_sees_a_partial_file(runtime_dir):
    s = store.CredentialStore(runtime_dir, mount=False)
    s.prepare()
    versions = [(b"%d" % i) * 200_000 for i in range(2)]
    s.write("g1", store.CREDENTIALS, versions[0], NOBODY, NOBODY)
    path, bad, stop = s.path("g1"), [], threading.Event()

    def reader():
        while not stop.is_set():
            with open(path, "rb") as fh:
                data = fh.read()
            if data not in versions:
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            s.write("g1", store.CREDENTIALS, versions[i % 2], NOBODY, NOBODY)
    finally:
        stop.set()
        t.join(10)
    assert not bad, f"a reader saw {len(bad)} partial files (sizes {bad[:5]})"
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_store__refuses_unsafe_names(runtime_dir):
    s = store.CredentialStore(runtime_dir, mount=False)
    s.prepare()
    for name in ("../x", "", "..", "a/b"):
        with pytest.raises(StoreError):
            s.write(name, store.CREDENTIALS, b"x", NOBODY, NOBODY)

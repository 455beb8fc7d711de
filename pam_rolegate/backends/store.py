"""Credential files on tmpfs: root-owned directories, 0600 files owned by their user, atomic writes.

Every path is walked with directory file descriptors and O_NOFOLLOW, and files are replaced by
rename, never written in place: a symlink, hard link or FIFO planted anywhere in the tree is
replaced or refused, never followed, so a root write cannot be redirected outside runtime_dir.
runtime_dir itself is reached the same way, from / down, and it and every parent must be
root-owned and not writable by group or others: a symlink or an unsafe parent is refused.

Layout (all directories root-owned):
    runtime_dir/                 0755  the broker's socket lives here
    runtime_dir/state/           0700  the broker's records (root only)
    runtime_dir/grants/          0711  users may pass through, not list
    runtime_dir/grants/GRANT/    0711
    runtime_dir/grants/GRANT/credentials   0600, owned by the grant's target user
    runtime_dir/grants/GRANT/config        0600, 0.3.0's process delivery file, kept for sessions
                                           begun before an upgrade until they end
    runtime_dir/grants/GRANT/token         0600, (delivery: container) the endpoint's token
"""

import errno
import os
import secrets
import stat
import subprocess

from ..errors import StoreError

GRANTS = "grants"
STATE = "state"
CREDENTIALS = "credentials"
# 0.3.0's process delivery pointed AWS_CONFIG_FILE here (a config file of its own, in place of the
# user's); sessions begun under it keep it until they end (registry: Grant.legacy_config).
AWS_CONFIG = "config"
TOKEN = "token"  # delivery container: the endpoint's authorization token
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MEMORY_FS = ("tmpfs", "ramfs")


def _unescape_mount(path):
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def fs_type(path, mountinfo="/proc/self/mountinfo"):
    """The filesystem type holding `path` (the longest mount point that contains it)."""
    path = os.path.realpath(path)
    best, best_type = "", None
    with open(mountinfo) as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            point = _unescape_mount(left.split()[4])
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, best_type = point, right.split()[0]
    return best_type


def credentials_ini(creds, named=(), command=None):
    """The AWS shared-credentials format: profile `default` with `creds`, or with `command` as its
    credential_process (delivery process), or neither (None: the endpoint serves it), then one
    section per named profile, `named` being (name, command) pairs whose credential_process fetches
    it. Every SDK reads credential_process from this file too (botocore, both AWS CLIs and the JS
    SDK merge it into the config file's profiles), so the user's own ~/.aws/config stays in use."""
    lines = ["# written by rolegate; replaced before it expires, removed at logout"]
    if command is not None:
        lines += ["[default]", f"credential_process = {command}"]
    elif creds is not None:
        lines += ["[default]", f"aws_access_key_id = {creds.access_key_id}",
                  f"aws_secret_access_key = {creds.secret_access_key}"]
        if creds.session_token:
            lines.append(f"aws_session_token = {creds.session_token}")
        if creds.expiration is not None:
            lines.append(f"# expires {creds.expiration.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    for name, command in named:
        lines += [f"[{name}]", f"credential_process = {command}"]
    return ("\n".join(lines) + "\n").encode()


def process_config_ini(region, command, named=()):
    """0.3.0's process delivery file, for sessions begun before an upgrade (AWS_CONFIG_FILE points at
    it): an AWS config file whose default profile, and each named one ((name, command) pairs),
    fetch credentials through credential_process. A config file names profiles `[profile NAME]`."""
    text = f"# written by rolegate for this session\n[default]\nregion = {region}\ncredential_process = {command}\n"
    for name, cmd in named:
        text += f"[profile {name}]\nregion = {region}\ncredential_process = {cmd}\n"
    return text.encode()


class CredentialStore:
    def __init__(self, runtime_dir, mount=True):
        self.runtime_dir = runtime_dir
        self.mount = mount

    # -- the safe walk -----------------------------------------------------------------------

    @staticmethod
    def _check_dir(fd, where):
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{where} is not a directory")
        if st.st_uid != 0:
            raise StoreError(f"{where} is owned by uid {st.st_uid}, not root; remove it and restart rolegated")
        if st.st_mode & 0o022:
            raise StoreError(f"{where} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                             f"remove it and restart rolegated")

    def _subdir(self, parent_fd, name, mode, where, create=True):
        """Open (creating if asked) a root-owned directory entry without following links.

        Anything else found there (a symlink, file or FIFO) can only have been left by root,
        as every parent is root-only: it is removed, not followed.
        """
        for _ in range(3):
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(name, mode, dir_fd=parent_fd)
                except FileExistsError:
                    pass
                continue
            except OSError as err:
                if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                os.unlink(name, dir_fd=parent_fd)
                continue
            try:
                os.fchmod(fd, mode)  # mkdir's mode passes through the umask
                self._check_dir(fd, where)
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise StoreError(f"{where} keeps changing under us; is something else writing to {self.runtime_dir}?")

    def _root_fd(self, create=True):
        """An fd on runtime_dir, reached safely from / (see open_safe_dir)."""
        return open_safe_dir(self.runtime_dir, "runtime_dir", "choose a directory under /run", create=create)

    def _grants_fd(self, create=True):
        root = self._root_fd()
        try:
            return self._subdir(root, GRANTS, 0o711, os.path.join(self.runtime_dir, GRANTS), create)
        finally:
            os.close(root)

    # -- public ------------------------------------------------------------------------------

    def prepare(self):
        """Make runtime_dir safe to use: a root-owned directory on tmpfs (mounting one if allowed)."""
        os.close(self._root_fd())
        kind = fs_type(self.runtime_dir)
        if kind not in _MEMORY_FS:
            if not self.mount:
                raise StoreError(f"{self.runtime_dir} is on {kind}, not tmpfs: credentials would reach the disk. "
                                 f"Mount a tmpfs there or set runtime_dir to a directory under /run")
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "mode=0755,uid=0,gid=0,nosuid,nodev,noexec,size=64m",
                 "rolegate", self.runtime_dir], capture_output=True, text=True)
            if done.returncode != 0 or fs_type(self.runtime_dir) not in _MEMORY_FS:
                raise StoreError(f"{self.runtime_dir} is on {kind}, not tmpfs, and mounting one failed: "
                                 f"{done.stderr.strip()}; set runtime_dir to a directory under /run")
            os.close(self._root_fd(create=False))  # the mount is a new directory: check it the same way
        os.close(self._grants_fd())
        os.close(self._state_fd())

    def path(self, grant_id, name=CREDENTIALS):
        return os.path.join(self.runtime_dir, GRANTS, grant_id, name)

    def write(self, grant_id, name, content, uid, gid):
        """Atomically put `content` at grants/GRANT/NAME, 0600, owned by uid:gid. Returns the path."""
        _check_name(grant_id)
        _check_name(name)
        grants = self._grants_fd()
        try:
            gfd = self._subdir(grants, grant_id, 0o711, self.path(grant_id, ""))
        finally:
            os.close(grants)
        try:
            _atomic_write(gfd, name, content, uid, gid)
        finally:
            os.close(gfd)
        return self.path(grant_id, name)

    def _state_fd(self):
        root = self._root_fd()
        try:
            return self._subdir(root, STATE, 0o700, os.path.join(self.runtime_dir, STATE))
        finally:
            os.close(root)

    def write_state(self, name, content):
        """Atomically replace state/NAME (root only, 0600): the broker's records."""
        _check_name(name)
        fd = self._state_fd()
        try:
            _atomic_write(fd, name, content, 0, 0)
        finally:
            os.close(fd)

    def read_state(self, name):
        """The content of state/NAME, or None when there is none."""
        _check_name(name)
        fd = self._state_fd()
        try:
            try:
                f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                return None
            with os.fdopen(f, "rb") as fh:
                return fh.read()
        finally:
            os.close(fd)

    def private_dir(self, name):
        """runtime_dir/NAME as a root-only (0700) directory, made without following links; its path."""
        _check_name(name)
        root = self._root_fd()
        try:
            os.close(self._subdir(root, name, 0o700, os.path.join(self.runtime_dir, name)))
        finally:
            os.close(root)
        return os.path.join(self.runtime_dir, name)

    def open_state(self, name, append=True):
        """A write descriptor on state/NAME (root only, 0600): appending to it, or replacing it."""
        _check_name(name)
        fd = self._state_fd()
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= os.O_APPEND if append else os.O_TRUNC
            out = os.open(name, flags, 0o600, dir_fd=fd)
            os.fchown(out, 0, 0)
            os.fchmod(out, 0o600)
            return out
        finally:
            os.close(fd)

    def rename_state(self, src, dst):
        """Atomically put state/SRC in place of state/DST."""
        _check_name(src)
        _check_name(dst)
        fd = self._state_fd()
        try:
            os.rename(src, dst, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)

    def remove_state(self, name):
        _check_name(name)
        fd = self._state_fd()
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def has(self, grant_id, name):
        """Whether grants/GRANT/NAME is there (a regular file; links are not followed)."""
        _check_name(grant_id)
        _check_name(name)
        grants = self._grants_fd(create=False)
        if grants is None:
            return False
        try:
            gfd = self._subdir(grants, grant_id, 0o711, self.path(grant_id, ""), create=False)
        finally:
            os.close(grants)
        if gfd is None:
            return False
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=gfd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False
        finally:
            os.close(gfd)

    def remove(self, grant_id):
        """Remove a grant's directory and everything in it. True when something was removed."""
        _check_name(grant_id)
        grants = self._grants_fd(create=False)
        if grants is None:
            return False
        try:
            try:
                gfd = os.open(grant_id, _DIR_FLAGS, dir_fd=grants)
            except FileNotFoundError:
                return False
            except OSError as err:
                if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                os.unlink(grant_id, dir_fd=grants)  # a planted non-directory: drop the entry only
                return True
            try:
                for entry in os.listdir(gfd):
                    os.unlink(entry, dir_fd=gfd)  # unlink never follows a symlink
            finally:
                os.close(gfd)
            os.rmdir(grant_id, dir_fd=grants)
            return True
        finally:
            os.close(grants)

    def grant_ids(self):
        grants = self._grants_fd(create=False)
        if grants is None:
            return []
        try:
            return sorted(os.listdir(grants))
        finally:
            os.close(grants)


def open_safe_dir(path, what, hint, create=True, mode=0o755, probe=False):
    """An fd on directory `path`, reached from / one component at a time without following links.

    Every ancestor must be as safe as the directory itself: whoever can write to a parent can
    swap the child for a link after we checked it, so /tmp (sticky or not) is refused too.
    Missing trailing components are created (the last one with `mode`, the others 0755), but only
    below a parent that passed the check. `what` names the setting in messages, `hint` says
    where a safe one would be. runtime_dir and rules_cache's directory are both reached this way.

    With `probe` nothing is created or changed and no read permission is needed (O_PATH): the
    walk stops at the first missing component (the broker would create the rest below a parent
    that passed) and returns None; it raises NotVisible where this user may not search a
    directory, so that what lies below it cannot be judged. See probe_safe_dir.
    """
    if not path.startswith("/"):
        raise StoreError(f"{what} {path!r} must be an absolute path; {hint}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StoreError(f"{what} {path!r} must not contain '..'; write it out in full")
    fd = os.open("/", (os.O_PATH if probe else os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    where = "/"
    try:
        _check_ancestor(fd, where, what, hint)
        for i, name in enumerate(parts):
            where = "/" + "/".join(parts[:i + 1])
            last = i == len(parts) - 1
            if probe:
                child = _probe_component(fd, name, where, what, hint)
                if child is None:
                    os.close(fd)
                    return None
            else:
                child = _open_component(fd, name, where, create, what, hint, mode if last else 0o755)
            os.close(fd)
            fd = child
            if last:
                CredentialStore._check_dir(fd, where)
            else:
                _check_ancestor(fd, where, what, hint)
    except BaseException:
        os.close(fd)
        raise
    return fd


class NotVisible(StoreError):
    """A directory on the way this user may not search: what lies below it cannot be checked."""


def probe_safe_dir(path, what, hint):
    """Refuse (StoreError) what open_safe_dir(path, ...) would refuse, changing nothing: the walk
    from / without following links, each parent root-owned and not writable by group or others,
    the directory itself too when it exists. Any user may run it; NotVisible where that user
    cannot search a directory (root sees all). A path whose tail is missing passes: the broker
    creates it below a parent that passed. check-config, the broker and doctor share this."""
    fd = open_safe_dir(path, what, hint, create=False, probe=True)
    if fd is not None:
        os.close(fd)


def _probe_component(parent_fd, name, where, what, hint):
    """open_safe_dir's step without creating or reading: an O_PATH fd on `name`, None if missing."""
    try:
        return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise NotVisible(f"{where} cannot be checked as uid {os.geteuid()}: its parent is not searchable "
                         f"by this user (root's check-config sees it)") from None
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
    _refuse_non_directory(parent_fd, name, where, what, hint)


def _refuse_non_directory(parent_fd, name, where, what, hint):
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
    raise StoreError(f"{where} is {kind}; {what} and each of its parents must be real root-owned "
                     f"directories not writable by others; {hint}")


def _open_component(parent_fd, name, where, create, what, hint, mode):
    """Open one path component below an already-checked parent; symlinks are refused, not followed."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise StoreError(f"{where} does not exist; start rolegated, it creates it") from None
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        _refuse_non_directory(parent_fd, name, where, what, hint)
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
    except FileExistsError:
        pass  # created meanwhile: the open below checks what is there now
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        os.fchmod(fd, mode)  # mkdir's mode passes through the umask; users must reach the socket
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_ancestor(fd, where, what, hint):
    """A parent: root-owned and writable by root only, or nothing below it is safe."""
    st = os.fstat(fd)
    if st.st_uid != 0:
        problem = f"is owned by uid {st.st_uid}, not root"
    elif st.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise StoreError(f"{where} {problem}; {what} and each of its parents must be real root-owned "
                     f"directories not writable by others; {hint}")


def _atomic_write(dir_fd, name, content, uid, gid, sync=False):
    """Write a temp file beside NAME (O_EXCL, O_NOFOLLOW, 0600, chowned first), then rename over it.
    With `sync` (files on disk, not tmpfs) the file and then the directory are flushed, so a crash
    leaves the old file or the new one, never an empty one."""
    for _ in range(5):
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise StoreError(f"could not create a temporary file for {name}")
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if sync:
        os.fsync(dir_fd)


def write_private_file(path, content, what, hint):
    """`content` at `path`: root's, 0600, replaced atomically and flushed to disk, in a directory
    reached by open_safe_dir (made 0700 when missing). For what must survive a reboot, such as
    the last good copy of the fleet rules."""
    fd = open_safe_dir(os.path.dirname(path), what, hint, mode=0o700)
    try:
        _atomic_write(fd, os.path.basename(path), content, 0, 0, sync=True)
    finally:
        os.close(fd)


def read_private_file(path, what, hint):
    """What write_private_file put at `path`, or None when there is none. A file that is a link,
    not root's, or readable or writable by others is refused, as is an unsafe directory."""
    if not os.path.lexists(os.path.dirname(path)):
        return None
    dir_fd = open_safe_dir(os.path.dirname(path), what, hint, create=False)
    try:
        try:
            fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise StoreError(f"{path} is a symbolic link; {what} must be a file of root's own") from None
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise StoreError(f"{path} is not a root-only file (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); "
                             f"remove it, rolegated writes a new one")
        return fh.read()


def _check_name(name):
    if not name or "/" in name or name in (".", ".."):
        raise StoreError(f"refusing unsafe file name {name!r}")

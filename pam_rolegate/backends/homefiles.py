"""Reading a file in a user's home as a root daemon must: the broker's read of ~/.aws/config.

At a PAM login the broker asks whether the target account's own ~/.aws/config names a region for
`default` (docs/sessions.md "Whose region wins"). The file is the user's, so every part of the read is
treated as hostile input, and none of it may stop, fail or slow a login past its budget:

- **As the user.** The read runs on a thread of its own whose filesystem uid and gid are the
  user's (setfsuid/setfsgid are per thread on Linux, unlike setuid, which glibc applies to every
  thread of the process): the kernel then checks every path step with the user's rights and drops
  the thread's DAC-override capabilities, so no trick of the path can reach a file the user could
  not read, and a root_squash NFS home (where root is "nobody") is read as the user, as the SDKs do.
  Python's os module has no setfsuid, and no packaged library offers it: two ctypes calls into libc.
  The thread keeps the broker's supplementary groups (setgroups would change every thread too): what
  they could add is a group-readable file of root's, and the owner checks below admit root's files
  only where root put them (a user cannot chown, and protected_hardlinks refuses a user a link to a
  file they cannot read and write).
- **No link the user controls is followed.** The path to the home directory (from the passwd
  database: the administrator's) is walked one component at a time with O_NOFOLLOW from `/`; a
  symlink there is followed only if root owns it and it sits in a root-owned directory no one else
  may write (an administrator's /home -> /data/home), and at most MAX_LINK_HOPS of them. The
  directory reached must be owned by the user. Below it, `.aws` and `config` are opened relative to
  their parent's descriptor with O_NOFOLLOW: a symlink there is refused, not followed.
- **Only a small regular file owned by the user (or root).** Checked before opening (so no device
  or FIFO is opened) and again on the open descriptor (O_NONBLOCK: a FIFO swapped in between
  cannot block the open); at most MAX_CONFIG_BYTES are read.
- **Bounded time.** The caller waits at most its budget; a read still running then (a hung NFS
  server) is abandoned to its thread, and at most READERS such threads exist: past that, and past
  MAX_WAITING reads queued, logins skip the read at once.

- **Read again only when it changed.** A HomeReader keeps what it last read for each user with the
  status (dev, inode, mode, owner, size, mtime_ns, ctime_ns) of the home directory, every directory
  below it and the file. Each later read still walks the path as the user, with every check above,
  and stats the file without opening it: when every status is the same, the bytes kept are the
  answer. Any chmod, chown, rename, write or link swap changes a ctime or an inode, so the file is
  read again (and refused again, where it now must be). A file changed within CACHE_SETTLE of the
  read is not kept: timestamps tick coarsely, and a second write in the same tick with the same
  size would otherwise look unchanged.

Every failure is an `Unreadable` with a reason that names the path step, never the contents.
"""

import errno
import functools
import os
import pwd
import stat
import threading
import time

from ..errors import RolegateError

# Real ~/.aws/config files are a few KiB even with dozens of profiles and SSO sessions; 64 KiB is
# ten times a large one and bounds what one login may make the broker read and parse (~1 ms).
MAX_CONFIG_BYTES = 64 * 1024
# A login's wait for the read. A local disk answers in well under a millisecond and a warm NFS
# home in a few; a slower answer means a server in trouble, and the login must not pay for it.
READ_BUDGET = 0.25
# Threads that read. A read stuck on a dead NFS server holds its thread until the server answers;
# four stuck reads mean the homes are down, and later logins skip the read instead of adding more.
READERS = 4
# Reads queued or running at once; a login arriving past this skips the read at once (a storm of
# logins behind stuck readers would otherwise each wait out their budget in the queue).
MAX_WAITING = 64
# The kernel's own limit on symlinks in one path lookup (MAXSYMLINKS).
MAX_LINK_HOPS = 40
# A file whose mtime or ctime is younger than this when read is read again next time: the kernel's
# timestamps tick every few ms (jiffies), and an NFS server's clock may run seconds apart from ours.
CACHE_SETTLE = 2.0
# What the cache may hold, all users together: real configs are a few KiB, so this is thousands of
# users; past it the oldest entries go (the next read of theirs is a full read, nothing worse).
CACHE_BYTES = 8 * 1024 * 1024
# How long peek() trusts the passwd facts (home, group) of the last read through the pool: as long
# as the PAM door trusts a login's NSS answer (doors/handlers.py RESOLVED_TTL).
PEEK_AGE = 30.0
AWS_CONFIG = (".aws", "config")  # below the home directory; AWS_CONFIG_FILE is unknown to PAM

_DIR_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Unreadable(RolegateError):
    """The file could not be read safely; `quiet` when that is ordinary (no such file)."""

    def __init__(self, reason, quiet=False):
        self.quiet = quiet
        super().__init__(reason)


def _libc():
    import ctypes  # here: the CLI's read_own needs none of it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setfsuid.argtypes = libc.setfsgid.argtypes = [ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


class FsIdentity:
    """This thread's filesystem uid and gid set to a user's for a `with` block, root's again after.

    setfsuid never reports failure; it returns the previous value, so each change is checked by a
    second call with an invalid id (-1), which changes nothing and returns the value in force."""

    _QUERY = 0xFFFFFFFF
    _libc = None
    _loaded = threading.Lock()

    def __init__(self, uid, gid):
        self.uid, self.gid = uid, gid

    @classmethod
    def _load(cls):
        with cls._loaded:
            if cls._libc is None:
                cls._libc = _libc() or False
        return cls._libc

    def _set(self, uid, gid):
        libc = self._libc
        libc.setfsgid(gid)
        libc.setfsuid(uid)
        mask = self._QUERY  # the calls return an int; ids are unsigned 32-bit
        return libc.setfsuid(self._QUERY) & mask == uid and libc.setfsgid(self._QUERY) & mask == gid

    def __enter__(self):
        if not self._load():
            raise Unreadable("setfsuid is not available")
        if not self._set(self.uid, self.gid):
            self._set(0, 0)
            raise Unreadable("could not take the user's filesystem identity")
        return self

    def __exit__(self, *exc):
        # Threads of the reader pool do nothing else, and each read sets its own identity first:
        # even a failed restore cannot lend a user's identity to anything but another read.
        self._set(0, 0)
        return False


def _no_entry(err, where):
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return Unreadable(f"no {where}", quiet=True)
    if err.errno in (errno.EACCES, errno.EPERM):
        return Unreadable(f"{where}: permission denied", quiet=True)
    return Unreadable(f"{where}: {errno.errorcode.get(err.errno, err.errno)}")


def _trusted_link(parent_st, link_st):
    """A symlink only root could have placed: root's, in a root-owned directory nobody else may write."""
    return (link_st.st_uid == 0 and parent_st.st_uid == 0
            and not parent_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def open_home(home, uid):
    """An O_PATH descriptor of `home`, owned by `uid`, reached without following a user's link."""
    if not home.startswith("/"):
        raise Unreadable("the home directory is not an absolute path")
    fd = os.open("/", _DIR_FLAGS | os.O_DIRECTORY)
    parts = [p for p in home.split("/") if p]
    hops = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            try:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                raise _no_entry(err, "home directory") from None
            st = os.fstat(nfd)
            if stat.S_ISLNK(st.st_mode):
                parent = os.fstat(fd)
                os.close(nfd)
                hops += 1
                if hops > MAX_LINK_HOPS or not _trusted_link(parent, st):
                    raise Unreadable("the path to the home directory has a link root did not place")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    root = os.open("/", _DIR_FLAGS | os.O_DIRECTORY)
                    os.close(fd)
                    fd = root
                parts = [p for p in target.split("/") if p] + parts
                continue
            if not stat.S_ISDIR(st.st_mode):
                os.close(nfd)
                raise Unreadable("the home directory path names something that is not a directory")
            os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise Unreadable("the home directory is not owned by the user")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _owned(st, uid):
    return st.st_uid in (uid, 0)


def _stamp(st):
    """What must stay the same for a kept read to still be the answer: which inode, its type, mode and
    owner (the rights the read was made with), its size and both its times."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# Filesystems whose metadata a stat answers from this machine: a check of a home on one of these may
# run where nothing may wait long (the PAM door's loop). Anything else (NFS, CIFS, FUSE) may hang.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "jfs", "zfs"})


def _filesystem_of(dev):
    """The type of the filesystem mounted from device `dev` (st_dev), or None when no mount says."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and "-" in fields:
                    return fields[fields.index("-") + 1]
    except OSError:
        pass
    return None


class StatCache:
    """The bytes last read per (user, home, path), with the stamps of every step to them; and for
    each user, the passwd facts (home, group) of the last read through the pool and whether that
    home is on a local filesystem, which peek() uses without asking NSS. Thread-safe."""

    def __init__(self, max_bytes=CACHE_BYTES, settle=CACHE_SETTLE, clock=time.time_ns):
        self.max_bytes = max_bytes
        self.settle_ns = int(settle * 1e9)
        self.clock = clock
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._kept = {}  # key -> (stamps, bytes), oldest first
        self._bytes = 0
        self._homes = {}  # (uid, parts, limit) -> (gid, home, local, time.monotonic() of the NSS answer)
        self._local = {}  # st_dev -> whether its filesystem is local

    def resolved(self, uid, parts, limit, gid, home, dev):
        """A read through the pool asked NSS for `uid` now and found `home` on device `dev`."""
        local = self._local.get(dev)
        if local is None:
            local = self._local[dev] = _filesystem_of(dev) in LOCAL_FILESYSTEMS
        with self._lock:
            if len(self._homes) >= 65536:  # bounded however many uids log in
                self._homes.clear()
            self._homes[(uid, tuple(parts), limit)] = (gid, home, local, time.monotonic())

    def home_of(self, uid, parts, limit, max_age):
        """(gid, home) of `uid`'s last read when NSS said so within `max_age` s and the home is local."""
        found = self._homes.get((uid, tuple(parts), limit))
        if found is None or not found[2] or time.monotonic() - found[3] > max_age:
            return None
        return found[0], found[1]

    def get(self, key, stamps):
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept[0] == stamps:
                self.hits += 1
                return kept[1]
            self.misses += 1
            return None

    def put(self, key, stamps, data, st):
        """Keep `data`, read from a file whose fstat was `st`, unless it changed too recently to tell."""
        settled = self.clock() - self.settle_ns
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            if st.st_mtime_ns > settled or st.st_ctime_ns > settled or len(data) > self.max_bytes:
                return
            while self._kept and self._bytes + len(data) > self.max_bytes:
                oldest = next(iter(self._kept))  # dicts keep insertion order: the oldest entry first
                self._bytes -= len(self._kept.pop(oldest)[1])
            self._kept[key] = (stamps, data)
            self._bytes += len(data)


def read_below(home_fd, parts, uid, limit=MAX_CONFIG_BYTES, cache=None, key=None, stamps=(), kept_only=False):
    """The bytes of home/parts[0]/.../parts[-1]: no symlink, directories and a regular file owned by
    `uid` or root, at most `limit` bytes. With a `cache`, the file is opened only when its status or
    that of a step to it (`stamps`: the home's, and the directories' here) differs from the last read's."""
    fd = os.dup(home_fd)
    stamps = list(stamps)
    try:
        for name in parts[:-1]:
            try:
                nfd = os.open(name, _DIR_FLAGS | os.O_DIRECTORY, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(name, fd):
                    raise Unreadable(f"{name} is a symlink (not followed)") from None
                raise _no_entry(err, name) from None
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode) or not _owned(st, uid):
                raise Unreadable(f"{name} is not a directory of the user's")
            stamps.append(_stamp(st))
        where = "/".join(parts)
        try:  # before opening: no device or FIFO is ever opened, no link followed
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except OSError as err:
            raise _no_entry(err, where) from None
        if cache is not None:  # the same inodes with the same rights and times: what was read is the answer
            kept = cache.get(key, tuple(stamps) + (_stamp(st),))
            if kept is not None or kept_only:
                return kept
        _check_file(st, uid, limit, where)
        try:
            ffd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as err:
            raise _no_entry(err, where) from None
        try:
            opened = os.fstat(ffd)
            _check_file(opened, uid, limit, where)  # what was opened, whatever was swapped in
            data = _read_bounded(ffd, limit, where)
            if cache is not None:  # stamped with what was opened: a swap after the stat is read again
                cache.put(key, tuple(stamps) + (_stamp(opened),), data, opened)
            return data
        finally:
            os.close(ffd)
    finally:
        os.close(fd)


def _read_bounded(fd, limit, where):
    chunks, got = [], 0
    while got <= limit:
        chunk = os.read(fd, limit + 1 - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > limit:  # it grew after the size check
        raise Unreadable(f"{where} is larger than {limit} bytes")
    return b"".join(chunks)


def read_own(path, limit=MAX_CONFIG_BYTES):
    """A file of the caller's own (the CLI, run by the user: their rights, links followed as the
    SDKs follow them): a regular file of at most `limit` bytes, opened without blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise _no_entry(err, path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{path} is not a regular file")
        if st.st_size > limit:
            raise Unreadable(f"{path} is larger than {limit} bytes")
        return _read_bounded(fd, limit, path)
    finally:
        os.close(fd)


def _is_link(name, fd):
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _check_file(st, uid, limit, where):
    if stat.S_ISLNK(st.st_mode):
        raise Unreadable(f"{where} is a symlink (not followed)")
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable(f"{where} is not a regular file")
    if not _owned(st, uid):
        raise Unreadable(f"{where} is not owned by the user or root")
    if st.st_size > limit:
        raise Unreadable(f"{where} is larger than {limit} bytes")


def read_user_file(uid, parts, limit=MAX_CONFIG_BYTES, cache=None):
    """Read home/parts of account `uid` with its own filesystem identity (the steps above); with a
    StatCache, only when something on the way changed since the last read."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise Unreadable(f"uid {uid} has no passwd entry") from None
    with FsIdentity(uid, pw.pw_gid):
        try:
            home_fd = open_home(pw.pw_dir, uid)
        except OSError as err:
            raise _no_entry(err, "home directory") from None
        try:
            if cache is None:
                return read_below(home_fd, parts, uid, limit)
            # The passwd entry's home and group are part of the key: a new home is a new file.
            key = (uid, pw.pw_gid, pw.pw_dir, tuple(parts), limit)
            home_st = os.fstat(home_fd)
            cache.resolved(uid, parts, limit, pw.pw_gid, pw.pw_dir, home_st.st_dev)
            return read_below(home_fd, parts, uid, limit, cache, key, (_stamp(home_st),))
        except OSError as err:
            raise _no_entry(err, "/".join(parts)) from None
        finally:
            os.close(home_fd)


class _Job:
    __slots__ = ("uid", "parts", "limit", "done", "result", "error", "state")

    def __init__(self, uid, parts, limit):
        self.uid, self.parts, self.limit = uid, parts, limit
        self.done = threading.Event()
        self.result = self.error = None
        self.state = "queued"  # -> running -> finished; or given up while queued -> dropped


class HomeReader:
    """A few reader threads with a waiting cap; `read` never waits past its timeout.

    Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit,
    so one read stuck on a dead server would hold the broker's stop for as long as it hangs. When
    every reader holds a read its caller gave up on (the homes are not answering), later reads are
    refused at once instead of each waiting out its budget in the queue."""

    def __init__(self, readers=READERS, max_waiting=MAX_WAITING, read=None, cache=None):
        self.cache = cache or StatCache()
        self._read = read or functools.partial(read_user_file, cache=self.cache)
        self._readers = readers
        self._max_waiting = max_waiting
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue = []  # jobs not yet taken, oldest first
        self._waiting = 0  # jobs queued or running
        self._overdue = 0  # running jobs whose caller gave up on them
        self._closed = False
        for n in range(readers):
            threading.Thread(target=self._serve, name=f"home-read-{n}", daemon=True).start()

    def _serve(self):
        while True:
            with self._work:
                while not self._queue and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                job = self._queue.pop(0)
                job.state = "running"
            try:
                job.result = self._read(job.uid, job.parts, job.limit)
            except BaseException as err:  # handed to the caller, who raises or has gone
                job.error = err
            with self._lock:
                if job.state == "overdue":
                    self._overdue -= 1
                job.state = "finished"
                self._waiting -= 1
            job.done.set()

    def read(self, uid, parts=AWS_CONFIG, limit=MAX_CONFIG_BYTES, timeout=READ_BUDGET):
        """The file's bytes, or Unreadable (the reason) within `timeout` seconds."""
        if timeout <= 0:
            raise Unreadable("no time left in the login's budget")
        job = _Job(uid, parts, limit)
        with self._work:
            if self._closed:
                raise Unreadable("the broker is stopping")
            if self._overdue >= self._readers:
                raise Unreadable(f"all {self._readers} readers are stuck on earlier reads (homes not answering?)")
            if self._waiting >= self._max_waiting:
                raise Unreadable("too many reads of home directories pending (homes not answering?)")
            self._waiting += 1
            self._queue.append(job)
            self._work.notify()
        if not job.done.wait(timeout):
            with self._lock:
                if job.state == "queued":  # never started: it will not run, nor count
                    self._queue.remove(job)
                    job.state = "dropped"
                    self._waiting -= 1
                elif job.state == "running":  # left to finish on its own, holding its reader
                    job.state = "overdue"
                    self._overdue += 1
            if job.state != "finished":
                raise Unreadable(f"the read took longer than {timeout:.2f} s (left to finish on its own)")
        if job.error is not None:
            raise job.error
        return job.result

    def peek(self, uid, parts=AWS_CONFIG, limit=MAX_CONFIG_BYTES, max_age=PEEK_AGE):
        """What a read would answer, found on the calling thread without NSS and without opening the
        file: the kept bytes when the walk as the user (every check of a read) finds nothing changed,
        Unreadable when the walk itself says no (no such file, a link, ...). None when this cannot be
        told here: no read through the pool within `max_age` s (whose NSS answer names the home),
        a home not on a local filesystem (a stat there may hang), or something changed (the file
        must be read: through the pool)."""
        found = self.cache.home_of(uid, parts, limit, max_age)
        if found is None:
            return None
        gid, home = found
        key = (uid, gid, home, tuple(parts), limit)
        try:
            # On the caller's thread (the PAM door's loop), which goes back to root's identity on
            # the way out: setfsuid(0) cannot fail while the effective uid is 0, as the broker's is.
            with FsIdentity(uid, gid):
                home_fd = open_home(home, uid)
                try:
                    return read_below(home_fd, parts, uid, limit, self.cache, key, (_stamp(os.fstat(home_fd)),),
                                      kept_only=True)
                finally:
                    os.close(home_fd)
        except OSError:
            return None

    def close(self):
        with self._work:
            self._closed = True
            for job in self._queue:
                job.state = "dropped"
            self._queue.clear()
            self._work.notify_all()

"""Process identity from /proc: a pid plus its start time names one process, even after pid reuse."""


def start_time(pid):
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])


def alive(pid, started):
    """True while the process `pid` that started at `started` still exists (and is no zombie)."""
    if not pid or pid <= 0:
        return False
    now = start_time(pid)
    if now is None or (started and now != started):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return data[data.rindex(b")") + 2:][:1] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def parent(pid):
    """The parent pid of `pid` (field 4 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(data[data.rindex(b")") + 2:].split()[1])

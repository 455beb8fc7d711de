"""Process identity from /proc: a pid plus its start time names one process, even after pid reuse."""


def _stat_fields(pid):
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None when there is no such process.

    The command name (field 2) may hold spaces and parentheses, so we split after the last ')'.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return data[data.rindex(b")") + 2:].split()


def start_time(pid):
    """The process's start time in clock ticks since boot (field 22), or None."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def parent(pid):
    """The parent pid of `pid` (field 4), or None."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def alive(pid, started):
    """True while the process `pid` that started at `started` still exists (and is no zombie)."""
    if not pid or pid <= 0:
        return False
    fields = _stat_fields(pid)
    if not fields or (started and int(fields[19]) != started):
        return False
    return fields[0] != b"Z"

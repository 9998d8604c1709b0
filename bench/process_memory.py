"""Peak resident memory of this process, resettable between the runs of one benchmark."""
from __future__ import annotations

import gc
import resource
import sys
from pathlib import Path


def reset_peak_rss() -> bool:
    """Start a new peak: on Linux, writing 5 to /proc/self/clear_refs resets VmHWM to the current
    RSS. Returns False where that is not possible (the peak is then the process's so far)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    """A kB field of /proc/self/status in MB; None where there is no such file or field (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """VmHWM in MB (since the last reset); elsewhere the process's peak from getrusage."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def anonymous_rss_mb() -> float:
    """RssAnon in MB now: resident memory that only swap could free (not file pages such as a
    memory-mapped cache, which the kernel drops and reads back as needed). 0 where unknown."""
    return _status_mb("RssAnon") or 0.0


def pss_mb(pid: int | str = "self") -> float:
    """Proportional set size in MB now (/proc/PID/smaps_rollup): resident pages, each page shared
    by k processes counted 1/k, so that memory shared by the ranks of a machine (a memory-mapped
    file, shared libraries) counts once across them. 0 where unknown (not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0

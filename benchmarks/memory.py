"""Resident memory of this process, from /proc/self/status (Linux), for the benchmark cases
that run in a fresh process each."""

from __future__ import annotations


def status_mb(field: str) -> float:
    """`VmRSS`, `VmHWM` (peak RSS), ... in MiB; NaN where the kernel does not say."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return status_mb("VmHWM")


def reset_peak() -> None:
    """VmHWM back to the current RSS ("5" to clear_refs), to measure a part of a process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

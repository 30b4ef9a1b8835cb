"""Shared by the benchmark scripts: reading this process's memory counters from /proc (Linux)."""

from __future__ import annotations


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes, e.g. "VmHWM" (peak RSS) or "VmRSS" (current RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"no {key} in /proc/self/status")

"""Shared by the benchmark scripts: reading this process's memory counters from /proc (Linux)."""

from __future__ import annotations


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes, e.g. "VmHWM" (peak RSS) or "VmRSS" (current RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"no {key} in /proc/self/status")


def allocator_env(env: dict[str, str], choice: str) -> dict[str, str]:
    """A child's environment for its C allocator (src/sdx4/allocator.py): "sdx4" (what the `sdx4` command would
    run on: tcmalloc when the system has it), "tcmalloc" (preloaded when installed) or "system" (nothing
    preloaded: what a plain diffusers script gets)."""
    from sdx4.speed.allocator import ENV, REEXEC_MARK, reexec_env

    base = {k: v for k, v in env.items() if k not in ("LD_PRELOAD", REEXEC_MARK)}
    if choice == "tcmalloc":
        base.pop(ENV, None)  # tcmalloc whatever the user's SDX4_ALLOCATOR says
    if choice in ("sdx4", "tcmalloc"):
        preloaded = reexec_env(base, current="system")  # what the sdx4 command would re-execute with
        if preloaded is not None or choice == "sdx4":
            return preloaded or base
    return {**base, ENV: "system"}

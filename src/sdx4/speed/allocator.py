"""tcmalloc for CPU runs: the C allocator is part of the speed.

glibc's malloc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free (mallopt cannot raise
that threshold past 32 MiB). From about 128 latent pixels up, the UNet's and the VAE decoder's activations are
larger than that, so every call page-faults and zeroes its whole working set again (~3 million page faults per
272x272 UNet call). tcmalloc (gperftools) keeps freed spans and hands them out again. Measured on a 2-core Xeon
(full-size UNet, fp32, processes alternating): 272x272 batch-1 calls 298-357 us per latent pixel against 427-538
with glibc, 128x128 batch-2 calls 279-359 against 380-463 (docs/speed.md, "The C allocator").

LD_PRELOAD only acts when a process starts, so the `sdx4` command re-executes itself once, with tcmalloc
preloaded, when the system has it (Debian/Ubuntu: `apt install libtcmalloc-minimal4`) and the command runs the
diffusion model. SDX4_ALLOCATOR=system keeps the system allocator; SDX4_ALLOCATOR=/path/to/libtcmalloc.so picks
the library. Python API users preload it themselves (`LD_PRELOAD=libtcmalloc_minimal.so.4 python app.py`).
No torch import here: this runs before the model is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping

#: auto (default: tcmalloc when the system has it), system, or the path of a tcmalloc library.
ENV = "SDX4_ALLOCATOR"
#: Set in the re-executed process, so that it never re-executes again (even if the preload did not take).
REEXEC_MARK = "SDX4_ALLOCATOR_REEXEC"
#: Library names tried by `find_tcmalloc` (gperftools' minimal build first: no heap profiler).
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")
#: tcmalloc prints a line for every allocation above 1 GiB unless told otherwise (the decoder's whole-image
#: tensors at 2048 px are 2-4 GiB); a user's own setting wins.
QUIET_ENV = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}


class AllocatorError(ValueError):
    """SDX4_ALLOCATOR names something that is not a usable choice."""


def find_tcmalloc() -> str | None:
    """The system's tcmalloc (a name the dynamic loader resolves, e.g. 'libtcmalloc_minimal.so.4'), or None."""
    for name in TCMALLOC_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def tcmalloc_release() -> Callable[[], object] | None:
    """tcmalloc's MallocExtension_ReleaseFreeMemory (gives its free memory back to the OS) when this process
    allocates with tcmalloc (preloaded by sdx4 or by the user), else None."""
    try:
        return ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (AttributeError, OSError):
        return None


def active() -> str:
    """'tcmalloc' when this process allocates with tcmalloc, else 'system'."""
    return "system" if tcmalloc_release() is None else "tcmalloc"


def _preloads_an_allocator(preload: str) -> bool:
    return any("malloc" in os.path.basename(p) for p in preload.replace(" ", ":").split(":") if p)


def reexec_env(
    environ: Mapping[str, str],
    find: Callable[[], str | None] = find_tcmalloc,
    platform: str = sys.platform,
    current: str | None = None,
) -> dict[str, str] | None:
    """The environment to re-execute this command with (tcmalloc preloaded), or None to go on as is.

    None when: SDX4_ALLOCATOR=system, not Linux, already re-executed once, this process already runs on
    tcmalloc (`current`, default `active()`), LD_PRELOAD already names an allocator (the user's choice), or
    (auto) no tcmalloc is installed. A SDX4_ALLOCATOR path that is not a file is an AllocatorError.
    """
    choice = environ.get(ENV, "auto").strip() or "auto"
    if choice == "system" or environ.get(REEXEC_MARK) or not platform.startswith("linux"):
        return None
    if choice == "auto":
        lib = None
    elif os.path.isfile(choice):
        lib = choice
    else:
        raise AllocatorError(
            f"{ENV}={choice!r}: not 'auto', 'system' or the path of a tcmalloc library file "
            "(e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)"
        )
    preload = environ.get("LD_PRELOAD", "")
    if (current or active()) == "tcmalloc" or _preloads_an_allocator(preload):
        return None
    lib = lib or find()
    if lib is None:
        return None
    env = {**QUIET_ENV, **environ, REEXEC_MARK: "1"}
    env["LD_PRELOAD"] = ":".join(p for p in (lib, preload) if p)
    return env


def reexec_with_tcmalloc() -> None:
    """Re-execute this very command (sys.orig_argv) with tcmalloc preloaded when `reexec_env` says so; returns
    only when it does not (or, with a warning on stderr, when the exec itself fails)."""
    env = reexec_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as e:
        print(f"sdx4: warning: could not restart with tcmalloc ({e}); going on with the system allocator",
              file=sys.stderr)

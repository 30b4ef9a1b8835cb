"""The work folder of a clip's run (`OUT.sdx4-parts/`): finished chunk files and a manifest that says which
are done and for which source and options, written atomically so that a kill at any moment leaves a folder
the same command continues from."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .errors import VideoInputError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
#: Bytes hashed at each end of the source for its fingerprint (with its size and modification time).
FINGERPRINT_BYTES = 1 << 20


def parts_folder(dst: str | Path) -> Path:
    """The work folder beside an output: `clip_x4.mp4` -> `clip_x4.mp4.sdx4-parts/`."""
    dst = Path(dst)
    return dst.with_name(dst.name + ".sdx4-parts")


def chunk_name(index: int, suffix: str) -> str:
    return f"chunk-{index:06d}{suffix}"


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Size, modification time and a SHA-256 of the first and last MiB: a changed source is noticed without
    reading all of it."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if st.st_size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, st.st_size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256_ends": h.hexdigest(),
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON into `path` through imageio's one atomic writer (temp file, fsync, rename)."""
    from ..imageio.write import write_atomic

    write_atomic(path, lambda f: f.write(json.dumps(data, indent=1).encode("utf-8")))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VideoInputError(
            f"{path}: unreadable ({e}); delete {folder} to start over"
        ) from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise VideoInputError(
            f"{path}: not a manifest of this sdx4; delete {folder} to start over"
        )
    return data


def mismatch(
    recorded: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> str | None:
    """The first key whose value differs between two records ("options.steps: 20 != 30"), None when equal."""
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = mismatch(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} then, {b!r} now"
    return None


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def clean_temps(folder: Path) -> None:
    """Remove what a killed run left half-written (chunk and manifest temp files)."""
    for p in folder.glob("*.tmp"):
        p.unlink(missing_ok=True)
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)

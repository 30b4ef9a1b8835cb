"""Where sdx4 keeps what it builds or measures once per machine: `$SDX4_CACHE`, else ~/.cache/sdx4."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    return Path(os.environ.get("SDX4_CACHE") or Path.home() / ".cache" / "sdx4")

"""Where sdx4 keeps what it builds or measures once per machine: `$SDX4_CACHE`, else ~/.cache/sdx4."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache folder (not created here)."""
    return Path(os.environ.get("SDX4_CACHE") or Path.home() / ".cache" / "sdx4")


#: What sdx4 keeps in the cache folder (and `clear` removes; nothing else there is touched, e.g. the
#: benchmarks' random models): the converted weights (model/weight_cache.py) and the embeddings of the prompts
#: given at load (engine/prompt_store.py), the time calibration (engine/estimate.py) and the bf16-vs-fp32
#: measurement (model/placement.py).
WEIGHTS_DIR = "weights"
PROMPTS_DIR = "prompts"
CALIBRATION_FILE = "estimate-calibration.json"
PRECISION_FILE = "cpu-precision.json"


def cache_info() -> dict[str, object]:
    """What sdx4 keeps in the cache folder: {"folder", "weights": [{"file", "bytes", "source", "dtype",
    "written"}], "weights_bytes", "prompts" (kept prompt embeddings), "prompts_bytes", "files": [the measurement
    files present], "total_bytes"}. No torch."""
    import json

    root = cache_root()
    entries = []
    folder = root / WEIGHTS_DIR
    for data in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        side = data.with_suffix(".json")
        try:
            meta = json.loads(side.read_text())
            key = meta.get("key", {}) if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            meta, key = {}, {}
        entries.append({"file": data.name, "bytes": data.stat().st_size, "source": key.get("source", "?"),
                        "dtype": key.get("dtype", "?"), "written": meta.get("written", "?") if isinstance(meta, dict) else "?"})
    files = [name for name in (CALIBRATION_FILE, PRECISION_FILE) if (root / name).is_file()]
    weights = sum(int(e["bytes"]) for e in entries)  # type: ignore[call-overload]
    kept = sorted((root / PROMPTS_DIR).glob("*.safetensors")) if (root / PROMPTS_DIR).is_dir() else []
    prompts = sum(p.stat().st_size for p in kept)
    return {"folder": str(root), "weights": entries, "weights_bytes": weights, "prompts": len(kept),
            "prompts_bytes": prompts, "files": files,
            "total_bytes": weights + prompts + sum((root / f).stat().st_size for f in files)}


def clear_cache(weights_only: bool = False) -> int:
    """Remove what sdx4 keeps in the cache folder (only the converted weights and the prompt embeddings made
    from them with `weights_only`); returns the bytes freed. Other files in the folder are left alone."""
    import shutil

    root = cache_root()
    freed = 0
    for folder in (root / WEIGHTS_DIR, root / PROMPTS_DIR):
        if folder.is_dir():
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder)
    if not weights_only:
        for name in (CALIBRATION_FILE, PRECISION_FILE):
            p = root / name
            if p.is_file():
                freed += p.stat().st_size
                p.unlink()
    return freed

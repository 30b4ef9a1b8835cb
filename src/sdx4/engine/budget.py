"""A memory budget instead of knobs: from `max_memory` choose the tile size and tile batch.

`plan_memory` is pure (sizes in, plan out) and tested alone; `default_budget` reads what the machine
has free. The cost model (bytes per latent pixel, fp32, CPU) was measured with
`benchmarks/calibrate_memory.py` on the full-size architecture; working memory scales with the element
size of the UNet's dtype. Sizes are latent pixels (== input pixels for this model).
The VAE decode's tile is fitted again after the loop, from the decoder's own plan (`decode_fit.py`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model.loading import Components
    from ..options import UpscaleOptions

#: Working memory of one UNet call: UNET_FIXED_BYTES + UNET_BYTES_PER_PIXEL per latent pixel per batch
#: sample, fp32, channels-last as the CPU runs it. benchmarks/calibrate_memory.py (Intel Xeon, batch 2,
#: one call in a fresh process): 0.185 GB at 64 px, 0.68 GB at 128 px, 1.31 GB at 192 px; inside whole
#: 256 px runs (benchmarks/large_images.py, peak 5.13 GiB with 1.97 GiB of weights) the call held ~3 GB,
#: ~23 kB per pixel per sample. The model gives 0.40 / 1.97 / 3.35 GB at 64 / 192 / 256 px.
UNET_BYTES_PER_PIXEL = 24_000
UNET_FIXED_BYTES = 192 * 2**20
#: Working memory of one VAE decode per latent pixel (the VAE always runs in fp32).
VAE_BYTES_PER_PIXEL = 100_000  # measured contiguous 103k (32 px), 74k (64), 79k (96); channels-last 75k, 55k, 50k
#: Whole-image tensors kept during the run, per latent pixel per generated image (latents, the
#: conditioning image, the float64 merge accumulators, the decoded and cropped output, uint8 copies).
GLOBAL_BYTES_PER_PIXEL = 1200
#: Allocator slack and small tensors, independent of the image.
FIXED_OVERHEAD = 256 * 2**20
#: Auto tiles never get smaller than this (the model was trained on 128x128 latents; small tiles see
#: too little context); an explicit --tile-size may go down to the UNet's multiple.
MIN_AUTO_TILE = 32
MAX_AUTO_TILE_BATCH = 8
#: Auto overlaps are a quarter of the tile but at most this (latent pixels = 128 output pixels): large
#: tiles need no wider blend band, and every overlap pixel is UNet work done twice.
MAX_AUTO_OVERLAP = 32
#: Margin added to each side of a VAE tile for the decoder's overlap when estimating its memory.
VAE_TILE_MARGIN = 16
#: Shares of the free memory used when no budget is given.
CPU_FREE_SHARE, CUDA_FREE_SHARE = 0.6, 0.8


class MemoryBudgetError(ValueError):
    """The budget cannot hold the model and the smallest tile; the message gives the numbers."""


@dataclass(frozen=True)
class MemoryPlan:
    """What the budget allows for one image (sizes in latent pixels)."""

    tile_size: int  # >= max(h, w): one tile, the untiled path
    tile_limit: int  # the largest tile the budget allows (tile_size may be smaller: same tile count, less waste)
    tile_overlap: int
    tile_batch: int
    tiles: int
    vae_tile_size: int | None  # None: decode the whole latent at once
    estimate_bytes: int  # predicted peak, weights included
    budget_bytes: int
    weights_bytes: int
    #: Batch samples per UNet call (None: a tile's whole batch, both halves of classifier-free guidance, in
    #: one call). 1 when that lets the image run in fewer tiles: half the working memory, the same FLOPs.
    unet_batch: int | None = None

    @property
    def tiled(self) -> bool:
        return self.tiles > 1

    def describe(self) -> dict[str, object]:
        return {
            "tile_size": self.tile_size,
            "tile_limit": self.tile_limit,
            "tile_overlap": self.tile_overlap,
            "tile_batch": self.tile_batch,
            "tiles": self.tiles,
            "unet_batch": self.unet_batch,
            "vae_tile_size": self.vae_tile_size,
            "memory_estimate_gib": round(self.estimate_bytes / 2**30, 3),
            "memory_budget_gib": round(self.budget_bytes / 2**30, 3),
        }


#: What the cross-attention key/value cache (kvcache.py) may hold through the loop per UNet sample of a call,
#: full-size UNet, fp32: 77 prompt tokens x 32768 projected features (52 projections) x 2 remembered inputs.
FULL_MODEL_KV_BYTES_PER_SAMPLE = 77 * 32768 * 4 * 2


def unet_work_bytes(tile_h: int, tile_w: int, samples: int, dtype_bytes: int = 4) -> int:
    """Working memory of one UNet call on `samples` tiles of tile_h x tile_w latent pixels."""
    return int((UNET_FIXED_BYTES + UNET_BYTES_PER_PIXEL * tile_h * tile_w * samples) * dtype_bytes / 4)


def vae_work_bytes(tile_h: int, tile_w: int, images: int) -> int:
    """Working memory of decoding `images` latents of tile_h x tile_w (fp32)."""
    return int(VAE_BYTES_PER_PIXEL * tile_h * tile_w * images)


def global_bytes(h: int, w: int, images: int) -> int:
    return GLOBAL_BYTES_PER_PIXEL * h * w * images + FIXED_OVERHEAD


def default_overlap(tile_size: int, multiple: int) -> int:
    """A quarter of the tile, at most MAX_AUTO_OVERLAP, on the UNet's grid (at least one grid step)."""
    return max(multiple, min(tile_size // 4, MAX_AUTO_OVERLAP) // multiple * multiple)


def plan_memory(
    h: int,
    w: int,
    *,
    budget_bytes: int,
    weights_bytes: int,
    samples_per_tile: int,
    images: int = 1,
    dtype_bytes: int = 4,
    multiple: int = 8,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    tile_batch: int | None = None,
    kv_bytes_per_sample: int = 0,
) -> MemoryPlan:
    """Choose tile size, overlap and tile batch for an h x w latent (a multiple of `multiple`).

    samples_per_tile: UNet batch per tile (2 x images with guidance, else images).
    kv_bytes_per_sample: what the UNet's key/value cache may hold per sample of a call (all the inputs it
    remembers: kvcache.bytes_per_sample), counted with each call's work.
    Explicit tile_size / tile_overlap / tile_batch win over the budget. The largest tile that fits is
    chosen (the whole latent when it fits: then nothing is tiled); when running the tile's samples one
    per UNet call (`unet_batch=1`) lets larger tiles fit and that needs fewer tiles, that is chosen
    instead; then as many tiles per call as fit. Larger images leave less room (whole-image tensors
    grow), so they never get larger tiles.
    """
    from .tiling import plan_tiles

    if h < 1 or w < 1 or h % multiple or w % multiple:
        raise ValueError(f"latent size {h}x{w} must be positive multiples of {multiple}")
    fixed = weights_bytes + global_bytes(h, w, images)
    work = budget_bytes - fixed

    def unet(t: int, k: int, per_call: int = samples_per_tile) -> int:
        return unet_work_bytes(min(t, h), min(t, w), k * per_call, dtype_bytes) + k * per_call * kv_bytes_per_sample

    full = max(h, w)
    lo = min(full, max(multiple, MIN_AUTO_TILE // multiple * multiple))

    def largest_tile(per_call: int) -> int:
        t = full
        while t > lo and unet(t, 1, per_call) > work:
            t -= multiple
        return t

    def layout(t: int) -> tuple[int, int, int]:
        """(tile, overlap, tile count) for a tile limit t."""
        if t >= full:
            return full, 0, 1
        ov = min(default_overlap(t, multiple), t - multiple) if tile_overlap is None else tile_overlap
        if tile_size is None:
            t = _shrink_to_count(full, t, ov, multiple)
        return t, ov, len(plan_tiles(h, w, t, ov, multiple))

    per_call = samples_per_tile
    if tile_size is None:
        t = largest_tile(per_call)
        if unet(t, 1) > work and samples_per_tile > 1 and unet(largest_tile(1), 1, 1) <= work:
            per_call = 1  # only one sample per call fits at all
        elif samples_per_tile > 1 and t < full and layout(largest_tile(1))[2] < layout(t)[2]:
            per_call = 1  # one sample per call: larger tiles, fewer of them, less UNet work on overlaps
        t = largest_tile(per_call)
        if unet(t, 1, per_call) > work:
            raise MemoryBudgetError(
                f"max_memory {budget_bytes / 2**30:.2f} GiB is too small: the weights ({weights_bytes / 2**30:.2f} GiB), "
                f"the whole-image tensors ({(fixed - weights_bytes) / 2**30:.2f} GiB) and one {t}x{t} tile "
                f"({unet(t, 1, per_call) / 2**30:.2f} GiB) need {(fixed + unet(t, 1, per_call)) / 2**30:.2f} GiB"
            )
    else:
        t = max(multiple, tile_size // multiple * multiple)
    t = min(t, full)
    limit = t
    t, overlap, tiles = layout(t)
    if per_call < samples_per_tile:
        k = 1  # tiles already split into single-sample calls
    elif tile_batch is None:
        k = 1
        while k < min(tiles, MAX_AUTO_TILE_BATCH) and unet(t, k + 1) <= work:
            k += 1
    else:
        k = min(tile_batch, tiles)
    # VAE: the whole latent when it fits, else the largest square tile that does.
    vae_tile: int | None = None
    vae = vae_work_bytes(h, w, images)
    if vae > work:
        vt = full
        while vt > multiple and vae_work_bytes(min(vt, h) + 2 * VAE_TILE_MARGIN, min(vt, w) + 2 * VAE_TILE_MARGIN, images) > work:
            vt -= multiple
        vae_tile = vt
        vae = vae_work_bytes(min(vt, h) + 2 * VAE_TILE_MARGIN, min(vt, w) + 2 * VAE_TILE_MARGIN, images)
    estimate = fixed + max(unet(t, k, per_call), vae)
    return MemoryPlan(
        tile_size=t,
        tile_limit=limit,
        tile_overlap=overlap,
        tile_batch=k,
        tiles=tiles,
        vae_tile_size=vae_tile,
        estimate_bytes=estimate,
        budget_bytes=budget_bytes,
        weights_bytes=weights_bytes,
        unet_batch=per_call if per_call < samples_per_tile else None,
    )


def _shrink_to_count(length: int, tile: int, overlap: int, multiple: int) -> int:
    """The smallest tile (on the grid) that needs no more windows along `length` than `tile` does.

    The UNet's cost is linear in the pixels it sees; tiles just big enough for their count waste
    less compute on overlaps (e.g. 256 px, overlap 40: two 152 px tiles instead of two 168 px ones).
    """
    from .tiling import tile_starts

    n = len(tile_starts(length, tile, overlap, multiple))
    need = -(-(length + (n - 1) * overlap) // n)  # ceil: n windows of this size with `overlap` cover length
    smallest = -(-need // multiple) * multiple
    while smallest < tile and len(tile_starts(length, smallest, overlap, multiple)) > n:
        smallest += multiple
    return min(tile, smallest)


def free_memory_bytes(device_type: str, device_index: int | None = None) -> int:
    """Free RAM (MemAvailable) on CPU/MPS, free memory of the GPU on CUDA."""
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device_index)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_budget(weights_bytes: int, device_type: str, device_index: int | None = None) -> int:
    """The loaded weights plus a safe share of what is free now (60% of RAM, 80% of GPU memory)."""
    share = CUDA_FREE_SHARE if device_type == "cuda" else CPU_FREE_SHARE
    return weights_bytes + int(share * free_memory_bytes(device_type, device_index))


_RELEASE: object = None  # None: not looked up yet; False: not available (neither glibc nor tcmalloc)


def release_memory(collect: bool = True) -> bool:
    """Give freed heap memory back to the operating system; True when the C allocator could do it.

    Freed tensors go back to the C allocator, which keeps them for reuse: after loading, after the text
    encoder is dropped and between the denoising loop and the VAE decode, that retained memory would add
    to the peak (measured: -165 MiB at the decode, -650 MiB when the text encoder is dropped).
    glibc's malloc_trim(0) returns it (a few ms); under tcmalloc (sdx4.allocator) its
    MallocExtension_ReleaseFreeMemory does. Elsewhere (musl, macOS, Windows) this is only a gc pass.
    `collect=False` skips the gc pass (for callers that know what they freed: the tiled decode, per op).
    """
    global _RELEASE
    import gc

    if collect:
        gc.collect()
    if _RELEASE is None:
        from ..speed.allocator import tcmalloc_release

        # tcmalloc first: when it is preloaded, glibc's malloc_trim would not see its heap
        _RELEASE = tcmalloc_release() or False
        if _RELEASE is False:
            import ctypes

            try:
                trim = ctypes.CDLL("libc.so.6").malloc_trim
                _RELEASE = lambda: trim(0)  # noqa: E731
            except (OSError, AttributeError):
                pass
    if _RELEASE is False:
        return False
    _RELEASE()  # type: ignore[operator]
    return True


#: Parameters of the published model (UNet 473M, text encoder 340M, VAE 84M), for estimates without loading it.
FULL_MODEL_PARAMS = {"unet": 473_000_000, "text_encoder": 340_000_000, "vae": 84_000_000}


# ---- the plan for a loaded model ----------------------------------------------------------------------


def weights_bytes(*modules: Any) -> int:
    """Bytes of the parameters and buffers of these modules (None: not loaded, 0). Buffers count: the
    UNet's packed weights are buffers (prepack.py)."""
    return sum(
        t.numel() * t.element_size() for m in modules if m is not None for t in itertools.chain(m.parameters(), m.buffers())
    )


def plan_for(components: Components, options: UpscaleOptions, h: int, w: int) -> MemoryPlan:
    """The memory plan for an h x w (padded) latent: explicit tile options win over the budget."""
    import torch

    from ..speed import kvcache

    placement = components.placement
    # The weights resident now (the low-memory policy drops the text encoder between prompts).
    weights = weights_bytes(components.unet, components.vae, components.text_encoder)
    budget = options.max_memory
    if budget is None:
        budget = default_budget(weights, placement.device.type, placement.device.index)
    samples = options.num_images * (2 if options.do_guidance else 1)
    dtype_bytes = torch.tensor([], dtype=placement.unet_dtype).element_size()
    return plan_memory(
        h,
        w,
        budget_bytes=budget,
        weights_bytes=weights,
        samples_per_tile=samples,
        images=options.num_images,
        dtype_bytes=dtype_bytes,
        multiple=components.pad_multiple,
        tile_size=options.tile_size,
        tile_overlap=options.tile_overlap,
        tile_batch=options.tile_batch,
        kv_bytes_per_sample=kvcache.bytes_per_sample(components.unet, components.tokenizer.model_max_length, dtype_bytes),
    )


def check_memory(components: Components, options: UpscaleOptions, width: int, height: int) -> None:
    """Raise MemoryBudgetError now (before any heavy work) if a pass of this input cannot fit."""
    from .scale import pass_plan

    m = components.pad_multiple
    sizes = [(width, height)] + pass_plan((width, height), options.output_size((width, height)))[:-1]
    for w, h in sizes:  # the input of every x4 pass
        plan_for(components, options, -(-h // m) * m, -(-w // m) * m)


def overlap_for(plan: MemoryPlan, tile_size: int, multiple: int) -> int:
    """The plan's overlap, shrunk when an out-of-memory retry made the tile smaller."""
    if tile_size == plan.tile_size:
        return plan.tile_overlap
    return min(plan.tile_overlap or default_overlap(tile_size, multiple), default_overlap(tile_size, multiple))



# ---- what a job costs (the service's admission) ----------------------------------------------------


@dataclass(frozen=True)
class JobCost:
    """The UNet work of one job, in megapixel-steps: latent megapixels through the UNet, summed over every
    UNet sample of every denoising step of every x4 pass. 1.0 == one 1000x1000 latent, one sample, one step.
    The UNet's calls are nearly all of a job's time, and their time grows with these pixels, so this is the
    number a queue is bounded by (sdx4 serve --max-job-cost, --max-queue-cost).
    """

    megapixel_steps: float
    passes: int  # x4 passes (1 for scale <= 4, 2 above 4); 0 for the classical methods and Real-ESRGAN
    latent_pixels: int  # UNet input pixels of one sample of one step, summed over passes (padding and tile overlap included)
    samples: int  # UNet batch per tile: num_images x 2 with guidance > 1

    def describe(self) -> dict[str, object]:
        return {"megapixel_steps": round(self.megapixel_steps, 3), "passes": self.passes,
                "latent_pixels": self.latent_pixels, "samples": self.samples}


def _tile_count(length: int, tile: int, overlap: int, multiple: int) -> int:
    """How many windows tiling.tile_starts puts along `length` (no torch here)."""
    if length <= tile:
        return 1
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    return -(-(length - tile) // stride) + 1


def pass_work_pixels(width: int, height: int, options: UpscaleOptions, multiple: int) -> int:
    """Latent pixels one UNet sample sees per step for a width x height pass input: padded to `multiple`,
    and with an explicit `tile_size`, every tile counted whole (overlaps are UNet work done twice).
    Without one the budget picks tiles on the machine; the untiled area is counted (a lower bound)."""
    h, w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    if options.tile_size is None or options.tile_size >= max(h, w):
        return h * w
    tile = max(multiple, options.tile_size // multiple * multiple)
    overlap = options.tile_overlap if options.tile_overlap is not None else default_overlap(tile, multiple)
    th, tw = min(tile, h), min(tile, w)
    return _tile_count(h, tile, overlap, multiple) * _tile_count(w, tile, overlap, multiple) * th * tw


def job_cost(width: int, height: int, options: UpscaleOptions, multiple: int = 8) -> JobCost:
    """What upscaling a width x height input with `options` costs, before any work: pure arithmetic.

    cost = sum over x4 passes of (work pixels of the pass input) x steps x samples / 1e6, where samples =
    num_images x (2 with classifier-free guidance). Scale 2..4 is one pass over the input; 5..16 adds a
    pass over the intermediate image (engine/scale.py's pass_plan); a float scale or a width/height target
    is planned the same way from the exact output size (`options.output_size`: 1.5 or 3.5 one pass, 4.5 two).
    The classical methods and Real-ESRGAN (no UNet) cost 0.
    """
    from .scale import pass_plan

    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1; got {width}x{height}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}")
    if options.method != "sd":
        return JobCost(0.0, 0, 0, 0)
    sizes = [(width, height)] + pass_plan((width, height), options.output_size((width, height)))[:-1]
    pixels = sum(pass_work_pixels(w, h, options, multiple) for w, h in sizes)
    samples = options.num_images * (2 if options.do_guidance else 1)
    return JobCost(pixels * options.steps * samples / 1e6, len(sizes), pixels, samples)


def full_model_weights_bytes(dtype: str = "fp32", keep_text_encoder: bool = False) -> int:
    """Resident weights of the published model during a run: the UNet (and the text encoder when kept)
    in `dtype`, the VAE in fp32. The CPU default drops the text encoder once prompts are encoded."""
    nbytes = 4 if dtype == "fp32" else 2
    text = FULL_MODEL_PARAMS["text_encoder"] * nbytes if keep_text_encoder else 0
    return FULL_MODEL_PARAMS["unet"] * nbytes + text + FULL_MODEL_PARAMS["vae"] * 4


def main(argv: list[str] | None = None) -> int:
    """`python -m sdx4.memory --size 1024 1024 --max-memory 5GiB`: the plan and its estimate, no model loaded."""
    import argparse
    import json

    from ..options import parse_size

    p = argparse.ArgumentParser(prog="python -m sdx4.memory", description=main.__doc__)
    p.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("W", "H"), help="input size in px")
    p.add_argument("--max-memory", default=None, help="budget (default: as sdx4 upscale on this machine's CPU)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="UNet/text encoder precision")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--no-guidance", action="store_true", help="guidance <= 1 (one UNet sample per tile)")
    p.add_argument(
        "--keep-text-encoder",
        action="store_true",
        help="count the text encoder as resident during the run (--no-low-memory; default on the CPU: dropped)",
    )
    a = p.parse_args(argv)
    weights = full_model_weights_bytes(a.dtype, keep_text_encoder=a.keep_text_encoder)
    nbytes = 4 if a.dtype == "fp32" else 2
    budget = parse_size(a.max_memory) if a.max_memory else default_budget(weights, "cpu")
    w, h = a.size
    plan = plan_memory(
        -(-h // 8) * 8,
        -(-w // 8) * 8,
        budget_bytes=budget,
        weights_bytes=weights,
        samples_per_tile=a.num_images * (1 if a.no_guidance else 2),
        images=a.num_images,
        dtype_bytes=nbytes,
        kv_bytes_per_sample=FULL_MODEL_KV_BYTES_PER_SAMPLE * nbytes // 4,
    )
    print(json.dumps({"input": [w, h], "output": [4 * w, 4 * h], "weights_gib": round(weights / 2**30, 3), **plan.describe()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

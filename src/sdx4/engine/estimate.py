"""How long a run will take and how much memory it will hold, BEFORE it starts.

    seconds = text encoding (prompts not cached yet)
            + steps x sum over the UNet's calls of one step (fixed cost per call + cost per latent pixel x samples)
            + VAE decode (fixed + per latent pixel + the mid-block attention's pairs of latent pixels)
      summed over the x4 passes (scale 5..16 runs two) and, beyond scale 4, over the images.

The per-call, per-pixel and per-pair costs are a `Calibration` of THIS machine and model: a few UNet calls
and VAE decodes of small latents, timed with the loaded model (~1-2 s for the full-size model), kept in
`<cache>/estimate-calibration.json` per model config, device, dtypes, torch version, thread count and sdx4
version, so later estimates time nothing. Tiles, their batch and the peak memory come from the memory plan
(`budget.plan_for`), the same plan the run uses. The classical filters cost a measured time per output pixel.

Importing this module imports no torch (the front ends format estimates); measuring does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..cache import (
    CALIBRATION_FILE,  # the cache folder's names live there (sdx4 cache info / clear)
)
from ..options import PRESETS, UpscaleOptions

if TYPE_CHECKING:
    from ..model.loading import Components

log = logging.getLogger("sdx4")

#: UNet calibration sides, in multiples of the UNet's pad multiple (8 for the published model: 16 and 32 px).
UNET_SIDES = (2, 4)
#: VAE calibration sides in latent pixels (decoded to 4x: 32 and 64 px).
VAE_SIDES = (8, 16)
#: Tokens of the timed attention (the VAE mid-block's single-head attention over latent pixels).
ATTENTION_TOKENS = 1024


@dataclass(frozen=True)
class Calibration:
    """Measured costs of this machine and model (seconds). UNet: one call on `samples` latents of `px` pixels
    each costs unet_call_s + unet_px_s x px x samples (measured on guidance pairs, as runs make them). VAE:
    decoding one latent of px pixels costs vae_fixed_s + vae_px_s x px + vae_pair_s x px x min(px, window^2)
    (its mid-block attention: global up to the window, windowed beyond). text_s: encoding one prompt (None:
    the text encoder was not loaded when measured). Once per run: new_shape_s, what the first UNet call and
    the first decode of a shape not run before cost beyond later ones (oneDNN builds its kernels per shape),
    and release_s, handing freed memory back between the loop and the decode (budget.release_memory). Once
    per process: first_call_s, the first UNet call's extra cost (each layer packs its weight, prepack.py)."""

    unet_call_s: float
    unet_px_s: float
    vae_fixed_s: float
    vae_px_s: float
    vae_pair_s: float
    text_s: float | None = None
    measured_s: float = 0.0  # what measuring took
    new_shape_s: float = 0.0
    release_s: float = 0.0
    first_call_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        """A kept calibration; ValueError when it is malformed (then it is measured again)."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object, got {type(d).__name__}")  # noqa: TRY004  (callers catch ValueError)
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for name in names:
            v = d.get(name)
            if name == "text_s" and v is None:
                values[name] = None
                continue
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v < 0
            ):
                raise ValueError(f"{name} is {v!r}, expected a finite number >= 0")
            values[name] = float(v)
        if values["unet_px_s"] <= 0 or values["vae_px_s"] <= 0:
            raise ValueError("per-pixel costs must be positive")
        return cls(**values)


@dataclass(frozen=True)
class Estimate:
    """What a run will cost, before it starts (`Upscaler.estimate`).

    seconds: the whole call (text encoding, denoising, decoding; `parts` splits it). peak_bytes: the
    process' predicted peak, weights included (the memory plan's). steps: denoising steps per pass; tiles:
    latent tiles of the (last) pass; passes: x4 passes; output_size: (width, height) of each output image.
    summary: one line for people, e.g. "about 4 min 10 s, peak 3.1 GiB: 75 ddim steps over 1 tile; faster:
    --preset fast".
    """

    seconds: float
    peak_bytes: int
    steps: int
    tiles: int
    passes: int
    output_size: tuple[int, int]
    summary: str
    parts: dict[str, float] = dataclasses.field(default_factory=dict)
    #: The seconds of one denoising step of the first pass (the progress bar's prior).
    step_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "peak_bytes": int(self.peak_bytes),
            "output_size": list(self.output_size),
            "summary": self.summary,
        }


# ---- formatting (no torch) -------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    """12.3 -> "12 s", 250 -> "4 min 10 s", 4000 -> "1 h 7 min"; under a second: "0.4 s"."""
    if seconds < 0.1:
        return "under 0.1 s"
    if seconds < 1:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m} min {s} s" if s else f"{m} min"
    h, rest = divmod(s, 3600)
    return f"{h} h {rest // 60} min"


def format_bytes(n: int) -> str:
    """3.3e9 -> "3.1 GiB", 5e7 -> "48 MiB"."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{max(1, round(n / 2**20))} MiB"


def faster_preset(options: UpscaleOptions) -> str | None:
    """The name of the cheapest preset, when it runs fewer UNet steps than `options` (else None)."""
    name = min(PRESETS, key=lambda k: int(PRESETS[k]["steps"]))  # type: ignore[call-overload]
    return name if int(PRESETS[name]["steps"]) < options.steps else None  # type: ignore[call-overload]


def summary_line(
    seconds: float, peak_bytes: int, options: UpscaleOptions, tiles: int, passes: int
) -> str:
    text = f"{'' if seconds < 0.1 else 'about '}{format_seconds(seconds)}, peak {format_bytes(peak_bytes)}"
    if options.method != "sd":
        return f"{text}: {options.method} filter, no model"
    text += f": {options.steps} {options.scheduler} steps over {tiles} tile{'s' if tiles != 1 else ''}"
    if passes > 1:
        text += f" in each of {passes} x4 passes"
    hint = faster_preset(options)
    return text + (f"; faster: --preset {hint}" if hint else "")


# ---- classical filters (no torch) ------------------------------------------------------------------------


def classical_estimate(
    size: tuple[int, int], options: UpscaleOptions, seconds_per_pixel: float
) -> Estimate:
    """A classical filter: seconds = output pixels x the measured cost per output pixel; memory = the
    input and output images (RGBA, 8 bits) held at once."""
    w, h = size
    out = options.output_size(size)
    seconds = out[0] * out[1] * seconds_per_pixel
    peak = 4 * (w * h + out[0] * out[1])
    return Estimate(
        seconds,
        peak,
        0,
        0,
        0,
        out,
        summary_line(seconds, peak, options, 0, 0),
        {"resize": seconds},
    )


def measure_classical(method: str) -> float:
    """Seconds per output pixel of Pillow's `method` filter on this machine: a 128 px image to 512 px, best of 3."""
    from PIL import Image

    from .classical import resize

    im = Image.new("RGB", (128, 128), (100, 150, 200))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        resize(im, (512, 512), method)
        best = min(best, time.perf_counter() - t0)
    return best / (512 * 512)


# ---- the diffusion model -----------------------------------------------------------------------------------


def calibration_key(components: Components) -> str:
    """What a calibration depends on: the UNet's and VAE's configs (a hash), device, dtypes, torch, threads,
    the CPU, whether the speed tricks are on, and sdx4's version."""
    import torch

    from .._version import __version__
    from ..model.placement import cpu_model_name

    unet_config = (
        components.unet.config
        if components.unet is not None
        else components.unet_config
    )
    configs = {"unet": dict(unet_config), "vae": dict(components.vae.config)}
    digest = hashlib.sha256(
        json.dumps(configs, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    p = components.placement.describe()
    tricks = components.speed.as_dict() if components.speed is not None else {}
    packed = "prepacked" if tricks.get("prepacked_layers") else "plain"
    return (
        f"model {digest} | {p['device']} | unet {p['unet_dtype']} | vae {p['vae_dtype']} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | {cpu_model_name()} | {packed}{' compiled' if components.compiled else ''}"
        f" | sdx4 {__version__}"
    )


def _best_time(fn: Any, reps: int, sync: Any) -> float:
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _line(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(fixed, slope) through two timed points; a noisy pair (slope <= 0) becomes a line through the origin."""
    slope = (y2 - y1) / (x2 - x1)
    if slope <= 0:
        return 0.0, y2 / x2
    return max(0.0, y1 - slope * x1), slope


def measure_calibration(components: Components, reps: int = 2) -> Calibration:
    """Time the loaded model on small shapes (the same code paths as a run: UNet calls on guidance pairs with
    the speed tricks, `decode_latents`), and fit the per-call and per-pixel costs."""
    import torch

    from .. import speed
    from .denoiser import UNetCalls
    from .vae import decode_latents

    t_start = time.perf_counter()
    c = components
    device, dtype = c.placement.device, c.placement.unet_dtype
    sync = (
        (lambda: torch.cuda.synchronize(device))
        if device.type == "cuda"
        else (lambda: None)
    )
    unet, vae = c.unet, c.vae
    cfg = unet.config
    m = c.pad_multiple
    g = torch.Generator("cpu").manual_seed(0)
    embeds = torch.zeros(
        2,
        c.tokenizer.model_max_length,
        cfg.cross_attention_dim,
        dtype=dtype,
        device=device,
    )  # 2,77,D
    labels = torch.tensor([20, 20], device=device)
    calls = UNetCalls(unet, embeds, labels, None, pair_half=1)
    t = torch.tensor(500, device=device)
    points: list[tuple[float, float]] = []
    firsts: list[float] = []  # extra time of each shape's first call
    try:
        with torch.no_grad():
            for k in UNET_SIDES:
                side = k * m
                x = (
                    torch.randn(1, cfg.in_channels, side, side, generator=g)
                    .to(device, dtype)
                    .repeat(2, 1, 1, 1)
                )  # 2,7,s,s
                if c.placement.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                # warm-up: oneDNN builds kernels per shape (and the weights are packed on the first call)
                first = _best_time(lambda x=x: calls(x, t), 1, sync)
                best = _best_time(lambda x=x: calls(x, t), reps, sync)
                points.append((side * side * 2, best))  # 2 samples per call
                firsts.append(max(0.0, first - best))
    finally:
        # the key/value cache holds the calibration's embeddings: not the next image's
        speed.reset(unet)
    unet_call_s, unet_px_s = _line(*points[0], *points[1])

    vae_dtype = c.placement.vae_dtype
    lc = vae.config.latent_channels
    vae_points = []
    with torch.no_grad():
        for side in VAE_SIDES:
            z = torch.randn(1, lc, side, side, generator=g).to(device, vae_dtype)
            first = _best_time(
                lambda z=z: decode_latents(vae, z), 1, sync
            )  # warm-up, per shape
            best = _best_time(lambda z=z: decode_latents(vae, z), reps, sync)
            vae_points.append((side * side, best))
        vae_new_shape = max(0.0, first - best)
        channels = vae.config.block_out_channels[-1]
        q = torch.randn(1, 1, ATTENTION_TOKENS, channels, generator=g).to(
            device, vae_dtype
        )
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        attn = _best_time(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q),
            reps,
            sync,
        )
    vae_pair_s = attn / ATTENTION_TOKENS**2
    # The timed decodes include their (small) global attention: take it out of the line's points.
    (p1, t1), (p2, t2) = vae_points
    vae_fixed_s, vae_px_s = _line(
        p1,
        max(t1 - vae_pair_s * p1 * p1, 0.0),
        p2,
        max(t2 - vae_pair_s * p2 * p2, 1e-9),
    )

    from .budget import release_memory

    release_s = _best_time(release_memory, 1, sync)
    text_s = None
    if c.text_encoder is not None:
        from .prompts import encode_prompt

        with torch.no_grad():
            text_s = _best_time(lambda: encode_prompt(c, ""), 1, sync)
    return Calibration(
        unet_call_s,
        unet_px_s,
        vae_fixed_s,
        vae_px_s,
        vae_pair_s,
        text_s,
        measured_s=time.perf_counter() - t_start,
        new_shape_s=firsts[-1]
        + vae_new_shape,  # the second shape's: the weights were packed by then
        release_s=release_s,
        first_call_s=max(0.0, firsts[0] - firsts[-1]),
    )


def cached_calibration(components: Components) -> tuple[Calibration, bool]:
    """This machine's calibration for this model: read from the cache folder, or measured now and kept there
    (atomically: written to a temporary file, then renamed). Returns (calibration, whether it was cached)."""
    from ..cache import cache_root

    key = calibration_key(components)
    path = cache_root() / CALIBRATION_FILE
    known: dict[str, Any] = {}
    try:
        if path.exists():
            loaded = json.loads(path.read_text())
            known = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s (%s); measuring again", path, e)
    if key in known:
        try:
            return Calibration.from_dict(known[key]), True
        except ValueError as e:
            log.warning(
                "ignoring the malformed calibration of this machine in %s (%s); measuring again",
                path,
                e,
            )
    cal = measure_calibration(components)
    known[key] = cal.as_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measured again next time
        log.warning("could not keep the time calibration in %s: %s", path, e)
    return cal, False


@dataclass(frozen=True)
class TextCost:
    """What encoding the prompts costs now: 0 when they are cached; else per prompt (and a reload of a
    dropped text encoder)."""

    prompts_to_encode: int
    encode_s: float
    reload_s: float


def estimate_sd(
    components: Components,
    options: UpscaleOptions,
    size: tuple[int, int],
    cal: Calibration,
    text: TextCost,
    warm: bool = True,
) -> Estimate:
    """The estimate of a diffusion run on a size = (width, height) input (see the module's formula)."""
    from .budget import plan_for
    from .scale import NATIVE, pass_plan

    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image size must be at least 1x1; got {w}x{h}")
    m = components.pad_multiple
    out = options.output_size(size)  # scale (any float) or width/height: the exact size the run returns
    sizes = [size] + pass_plan(size, out)[:-1]  # the input of every x4 pass
    # as Upscaler.__call__: one pass over all images only when the output is exactly 4x; else each image alone
    native = out == (NATIVE * w, NATIVE * h)
    per_pass = options if native else options.replace(num_images=1)
    repeats = 1 if native else options.num_images
    n = per_pass.num_images
    samples = n * (2 if options.do_guidance else 1)
    window = options.vae_attention_window**2
    denoise = decode = 0.0
    peak, tiles, step_seconds = 0, 1, 0.0
    for i, (pw, ph) in enumerate(sizes):
        lh, lw = -(-ph // m) * m, -(-pw // m) * m  # padded latent
        plan = plan_for(components, per_pass, lh, lw)
        th, tw = min(plan.tile_size, lh), min(plan.tile_size, lw)
        calls = (
            plan.tiles * samples
            if plan.unet_batch
            else -(-plan.tiles // plan.tile_batch)
        )
        step = calls * cal.unet_call_s + plan.tiles * samples * cal.unet_px_s * th * tw
        if i == 0:
            step_seconds = step
        denoise += repeats * options.steps * step
        px = lh * lw
        decode += (
            repeats
            * n
            * (
                cal.vae_fixed_s
                + cal.vae_px_s * px
                + cal.vae_pair_s * px * min(px, window)
            )
        )
        peak, tiles = max(peak, plan.estimate_bytes), plan.tiles
    text_s = text.prompts_to_encode * text.encode_s + (
        text.reload_s if text.prompts_to_encode else 0.0
    )
    # once per pass: new shapes and the memory handed back; once per process: the weights packed
    passes = repeats * len(sizes)
    overhead = passes * (cal.new_shape_s + cal.release_s) + (
        0.0 if warm else cal.first_call_s
    )
    seconds = text_s + denoise + decode + overhead
    parts = {
        "text_encoding": text_s,
        "denoising": denoise,
        "decoding": decode,
        "overhead": overhead,
    }
    return Estimate(
        seconds,
        peak,
        options.steps,
        tiles,
        len(sizes),
        out,
        summary_line(seconds, peak, options, tiles, len(sizes)),
        parts,
        step_seconds,
    )

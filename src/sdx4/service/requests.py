"""What the service accepts, checked before anything is queued: its settings, the form's options, the upload's header and size, safe names. Pure functions, tested alone."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..imageio import (
    UPLOAD_FORMATS,
    ImageInputError,
    LoadedImage,
    as_loaded,
    output_name,
)
from ..options import (
    LOCAL_OPTIONS,
    LoraSpec,
    OptionsError,
    UpscaleOptions,
    option_defaults,
    scaled_size,
)
from .jobs import QueueSettings

log = logging.getLogger("sdx4.server")

API_KEY_ENV = "SDX4_API_KEY"


def _option_kinds() -> dict[str, tuple[str, tuple[str, ...]]]:
    """UpscaleOptions field -> ("integer" | "number" | "boolean" | "string", allowed strings for Literals).

    Read from the dataclass itself, so an option added there is accepted here with the same name; not the
    LOCAL_OPTIONS (files on the server's disk, such as gan_weights): a client never names a server path."""
    kinds: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, hint in typing.get_type_hints(UpscaleOptions).items():
        if name in LOCAL_OPTIONS:
            continue
        args = tuple(a for a in typing.get_args(hint) if a is not type(None))
        base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
        if base is bool:
            kinds[name] = ("boolean", ())
        elif base is int:
            kinds[name] = ("integer", ())
        elif base is float:
            kinds[name] = ("number", ())
        elif typing.get_origin(base) is typing.Literal:
            kinds[name] = ("string", tuple(str(a) for a in typing.get_args(base)))
        else:
            kinds[name] = ("string", ())
    return kinds


OPTION_KINDS = _option_kinds()
OPTION_NAMES = tuple(OPTION_KINDS)
NULLABLE_OPTIONS = tuple(k for k, v in option_defaults().items() if v is None)  # empty field -> None (seed)
#: The form field that picks a job's LoRAs among those `sdx4 serve --lora` offers (`LoraChoices`). Not an
#: UpscaleOptions field: LoRAs are part of the model, which the worker switches between jobs.
LORA_FIELD = "lora"
NO_LORA = "none"  # the field's value for the base model
#: Every text field of an upscale form: the options, and the LoRA choice.
FORM_FIELDS = (*OPTION_NAMES, LORA_FIELD)


def service_option_defaults() -> dict[str, object]:
    """The defaults of the options a client may send (OPTION_NAMES), for /v1/info and the OpenAPI form."""
    return {k: v for k, v in option_defaults().items() if k in OPTION_KINDS}

#: What the image part may declare as its type; the bytes themselves are checked by Pillow.
IMAGE_PART_TYPES = ("image/", "application/octet-stream")
#: Room for the option fields and multipart framing on top of the image bytes.
FORM_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of the service; every default is documented in docs/server.md."""

    api_key: str | None = None  # None: no key needed
    max_upload_bytes: int = 20 * 1024 * 1024  # 413 above this
    max_input_pixels: int = 1024 * 1024  # 413 above this, read from the image header before decoding
    max_output_pixels: int = 2048 * 2048  # (scale W) x (scale H) x num_images; 413 above this
    formats: tuple[str, ...] = UPLOAD_FORMATS  # Pillow format names (imageio.INPUT_FORMATS); 415 otherwise
    max_prompt_chars: int = 2000  # 422 above this (CLIP reads 77 tokens anyway)
    shutdown_timeout_s: float = 60.0  # how long shutdown waits for the running step before leaving
    queue: QueueSettings = field(default_factory=QueueSettings)
    # What a job may cost (engine/budget.job_cost: UNet megapixel-steps); 413 above, checked from the header.
    max_side: int = 4096  # input pixels on either side; 413 above (a 100000x1 strip is 0.1 MP but pads to 0.8)
    max_aspect: float = 16.0  # long side / short side of the input; 422 above
    max_job_cost: float = 400.0  # one job; the default admits 1 MP at 75 steps with guidance (157) 2.5 times over
    max_queue_cost: float = 1600.0  # all queued jobs together; 429 + Retry-After above (the count limit is queue.max_queue)
    # Connections (guard.py): what uvicorn alone does not bound.
    max_connections: int = 100  # open at once; more get a bare 503 and are closed (keep it under `ulimit -n`)
    max_uploads: int = 4  # request bodies read at once; 503 + Retry-After above (each holds up to max_upload_bytes)
    body_timeout_s: float = 120.0  # a request body must arrive within this; 408 (20 MiB at ~1.4 Mbit/s)
    header_timeout_s: float = 10.0  # a new connection must send its request head within this; else closed
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
    # Who may call (guard.py).
    allowed_hosts: tuple[str, ...] = ()  # Host names besides IP addresses and localhost; 400 otherwise ("*": any)
    allowed_origins: tuple[str, ...] = ()  # Origins besides the server's own; 403 otherwise ("*": any)
    expose_paths: bool = False  # False: the model is shown by its Hub id or folder name, never a full path
    # Animations and videos (service/media.py). Animated GIF/WebP/APNG uploads are always taken; videos only
    # with allow_video (415 otherwise). Both within these, 413 above; pixel limits apply to each frame.
    allow_video: bool = False
    max_video_seconds: float = 60.0  # duration of a video or animation
    max_video_frames: int = 1800  # frames of a video or animation

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_input_pixels", "max_output_pixels", "max_prompt_chars",
                     "max_side", "max_connections", "max_uploads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(f"{name} must be a positive integer; got {value!r}", option=name)
        for name in ("max_job_cost", "max_queue_cost", "body_timeout_s", "header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise OptionsError(f"{name} must be a positive number; got {value!r}", option=name)
        if isinstance(self.max_aspect, bool) or not isinstance(self.max_aspect, (int, float)) or not 1 <= self.max_aspect < float("inf"):
            raise OptionsError(f"max_aspect must be a number >= 1; got {self.max_aspect!r}", option="max_aspect")
        if isinstance(self.max_video_frames, bool) or not isinstance(self.max_video_frames, int) or self.max_video_frames < 1:
            raise OptionsError(f"max_video_frames must be a positive integer; got {self.max_video_frames!r}", option="max_video_frames")
        v = self.max_video_seconds
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise OptionsError(f"max_video_seconds must be a positive number; got {v!r}", option="max_video_seconds")
        if self.api_key is not None and not self.api_key:
            raise OptionsError("api_key must not be empty (use None for no key)", option="api_key")
        for name in ("allowed_hosts", "allowed_origins"):
            bad = [v for v in getattr(self, name) if not isinstance(v, str) or not v.strip() or v != v.strip()]
            if bad:
                raise OptionsError(f"{name}: {bad[0]!r} is not a host name or origin", option=name)

    def limits(self) -> dict[str, Any]:
        q = self.queue
        return {
            "max_upload_bytes": self.max_upload_bytes,
            "max_input_pixels": self.max_input_pixels,
            "max_output_pixels": self.max_output_pixels,
            "formats": list(self.formats),
            "max_prompt_chars": self.max_prompt_chars,
            "max_queue": q.max_queue,
            "result_ttl_s": q.result_ttl_s,
            "max_results": q.max_results,
            "max_result_bytes": q.max_result_bytes,
            "max_side": self.max_side,
            "max_aspect": self.max_aspect,
            "max_job_cost": self.max_job_cost,
            "max_queue_cost": self.max_queue_cost,
            "cost_unit": "megapixel-steps",
            "allow_video": self.allow_video,
            "max_video_seconds": self.max_video_seconds,
            "max_video_frames": self.max_video_frames,
        }


@dataclass(frozen=True)
class LoraChoices:
    """The LoRAs a server offers (`sdx4 serve --lora`: merged at start, each at its serve-time scale), by file
    name in the order given, and what a job's `lora` field picks among them (`parse`).

    OptionsError (option "loras") when two share a name or a name holds a comma: jobs name LoRAs by file
    name, several separated by commas."""

    specs: tuple[LoraSpec, ...] = ()

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        for spec in self.specs:
            if names.count(spec.name) > 1:
                paths = ", ".join(s.path for s in self.specs if s.name == spec.name)
                raise OptionsError(f"loras: {names.count(spec.name)} LoRAs are named {spec.name} ({paths}); jobs choose "
                                   "LoRAs by file name: give each a different name", option="loras")
            if "," in spec.name:
                raise OptionsError(f"loras: {spec.name} has a comma in its name; jobs choose LoRAs by file name, "
                                   "several separated by commas: rename it", option="loras")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def default(self) -> str:
        """The `lora` value of a job that sends none: every offered LoRA (`none` when none is offered)."""
        return ",".join(self.names) or NO_LORA

    def parse(self, raw: str | None, method: str) -> tuple[str, ...] | None:
        """A job's `lora` field -> the names of the offered LoRAs merged for it, in the offered order (() =
        the base model), or None for a method without the model (nothing to switch). Absent or empty: every
        offered LoRA (`default`). 422 naming the field for a name not offered, a name given twice, `none`
        beside a name, or any value with a method other than sd."""
        text = (raw or "").strip()
        if method != "sd":
            if text:
                raise ApiError(422, f"lora is for method sd (the diffusion model); method {method} merges no LoRA: "
                               "leave lora out", LORA_FIELD)
            return None
        if not text:
            return self.names
        allowed = (f"{NO_LORA}, or one or more of {', '.join(self.names)} separated by commas" if self.names
                   else f"{NO_LORA} (this server offers no LoRAs; `sdx4 serve --lora FILE[:SCALE]` offers some)")
        if text == NO_LORA:
            return ()
        asked = [part.strip() for part in text.split(",")]
        for name in asked:
            if name == NO_LORA:
                raise ApiError(422, f"lora: {NO_LORA} is the base model and takes no other LoRA; got {short(text)!r}; "
                                   f"allowed: {allowed}", LORA_FIELD)
            if name not in self.names:
                raise ApiError(422, f"lora: {short(name)!r} is not a LoRA this server offers; allowed: {allowed}", LORA_FIELD)
            if asked.count(name) > 1:
                raise ApiError(422, f"lora: {name} is named twice; allowed: {allowed}", LORA_FIELD)
        return tuple(n for n in self.names if n in asked)

    def specs_of(self, names: tuple[str, ...]) -> tuple[LoraSpec, ...]:
        """The files and scales of these offered LoRAs (what `Upscaler.set_loras` takes); ValueError naming
        one no longer offered (a job recorded by a server started with other LoRAs)."""
        by_name = {s.name: s for s in self.specs}
        for name in names:
            if name not in by_name:
                offered = ", ".join(self.names) or "none"
                raise ValueError(f"LoRA {name} is not offered by this server (it offers: {offered})")
        return tuple(by_name[n] for n in names)


class Changes:
    """Wakes every waiting request when any job changes; the worker thread pokes it thread-safely."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.event = loop, asyncio.Event()

    def poke(self) -> None:  # any thread
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self.event.set()
        self.event = asyncio.Event()

    async def wait(self, since: asyncio.Event, timeout: float) -> None:
        """Until a change after `since` (= `self.event` taken BEFORE looking at the jobs), or `timeout` s."""
        try:
            await asyncio.wait_for(since.wait(), timeout)
        except asyncio.TimeoutError:
            pass


class ApiError(Exception):
    """An HTTP error with a message for people and the offending field (option or "image") for programs."""

    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.field, self.headers = status, detail, field, headers
        self.extra = extra or {}  # more fields of the JSON answer, e.g. {"limit": ..., "cost": ...}


# ---- pure request checks (tested alone) ------------------------------------------------------------


def parse_options(fields: dict[str, str], max_prompt_chars: int = 2000) -> UpscaleOptions:
    """Form fields (strings) -> UpscaleOptions; 422 naming the option on any bad or unknown value."""
    unknown = sorted(set(fields) - set(OPTION_NAMES))
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r}; allowed: image, {', '.join(OPTION_NAMES)}", unknown[0])
    values: dict[str, Any] = {}
    for name, raw in fields.items():
        kind, choices = OPTION_KINDS[name]
        text = raw.strip()
        if kind == "string" and choices and name in NULLABLE_OPTIONS and text == "":
            values[name] = None  # e.g. an empty preset field: no preset
        elif kind == "string":
            if len(raw) > max_prompt_chars:
                raise ApiError(422, f"{name} is {len(raw)} characters; the limit is {max_prompt_chars}", name)
            values[name] = text if choices else raw  # free text is kept as typed
        elif name in NULLABLE_OPTIONS and text == "":
            values[name] = None  # e.g. an empty seed field: draw one
        elif kind == "integer":
            try:
                values[name] = int(text)
            except ValueError:
                raise ApiError(422, f"{name} must be an integer; got {short(raw)!r}", name) from None
        elif kind == "number":
            try:
                values[name] = float(text)
            except ValueError:
                raise ApiError(422, f"{name} must be a number; got {short(raw)!r}", name) from None
        else:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ApiError(422, f"{name} must be true or false; got {short(raw)!r}", name)
            values[name] = text.lower() in ("true", "1")
    if values.get("scale") is not None and (values.get("width") is not None or values.get("height") is not None):
        # also scale=4, the default: a form that names both is ambiguous
        raise ApiError(422, f"give either scale ({values['scale']:g}) or width/height, not both", "scale")
    try:
        if values.get("preset") is not None:  # the preset's values for the fields not sent (sent ones win)
            return UpscaleOptions.from_preset(values.pop("preset"), **values)
        return UpscaleOptions(**values)
    except OptionsError as e:
        raise ApiError(422, str(e), e.option if e.option in OPTION_NAMES else None) from None


#: The fields of POST /v1/estimate besides the option fields: the input's size in pixels (`width`/`height`
#: there are the option fields, the output target, as in /v1/upscale).
ESTIMATE_SIZE_FIELDS = ("input_width", "input_height")


def parse_estimate(fields: dict[str, str], settings: ServerSettings) -> tuple[tuple[int, int], UpscaleOptions]:
    """POST /v1/estimate's form: input_width and input_height (the input's size; required, integers in
    1..max_side) and any option field (parse_options; width/height among them: the output target); 422 naming
    the field otherwise."""
    size = []
    for name in ESTIMATE_SIZE_FIELDS:
        raw = fields.get(name)
        if raw is None:
            raise ApiError(
                422, f"{name}: missing; send the input's size in pixels as input_width and input_height "
                "(width and height are the output target, as in /v1/upscale)", name,
            )
        try:
            value = int(raw.strip())
        except ValueError:
            raise ApiError(422, f"{name} must be an integer; got {short(raw)!r}", name) from None
        if not 1 <= value <= settings.max_side:
            raise ApiError(422, f"{name} must be in 1..{settings.max_side}; got {value}", name)
        size.append(value)
    options = parse_options({k: v for k, v in fields.items() if k not in ESTIMATE_SIZE_FIELDS}, settings.max_prompt_chars)
    return (size[0], size[1]), options


def short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def check_header(
    data: bytes, settings: ServerSettings, num_images: int, name: str = "image", scale: float = 4,
    output_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> Image.Image:
    """Open the image LAZILY (header only) and refuse it by format and pixel counts before any decoding.
    `output_size`: input size -> output size (`UpscaleOptions.output_size`, which may raise OptionsError for
    a width/height out of range: 422 naming it); default: scale x the input, rounded half up."""
    if not data:
        raise ApiError(422, f"{name}: empty file (0 bytes)", "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(settings.formats))
    except UnidentifiedImageError:
        raise ApiError(
            415, f"{name}: not a supported image; send one of {', '.join(settings.formats)}", "image"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard (89 MP warning, 179 MP error) fired while reading the header.
        raise ApiError(
            413, f"{name}: refused, far over the input limit of {settings.max_input_pixels} pixels ({e})", "image"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(422, f"{name}: cannot read the image header ({e})", "image") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise ApiError(422, f"{name}: empty image ({w}x{h})", "image")
    if w * h > settings.max_input_pixels:
        raise ApiError(
            413,
            f"{name}: {w}x{h} = {w * h} pixels is over the input limit of {settings.max_input_pixels} pixels",
            "image",
        )
    if max(w, h) > settings.max_side:
        raise ApiError(413, f"{name}: {w}x{h} has a side over the limit of {settings.max_side} pixels", "image")
    if max(w, h) / min(w, h) > settings.max_aspect:
        raise ApiError(
            422, f"{name}: {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.4g}, over the limit of {settings.max_aspect:g}", "image"
        )
    try:
        ow, oh = output_size((w, h)) if output_size is not None else scaled_size((w, h), scale)
    except OptionsError as e:
        raise ApiError(422, f"{name}: {e}", e.option if e.option in OPTION_NAMES else "image") from None
    out = ow * oh * num_images
    if out > settings.max_output_pixels:
        raise ApiError(
            413,
            f"{name}: the output would be {ow}x{oh}" + (f" x {num_images} images" if num_images > 1 else "")
            + f" = {out} pixels, over the output limit of {settings.max_output_pixels} pixels",
            "image",
        )
    return im


def decode_upload(
    data: bytes, settings: ServerSettings, num_images: int, name: str = "image", scale: float = 4,
    admit: Callable[[tuple[int, int]], None] | None = None,
    output_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> LoadedImage:
    """Checked header -> `admit(size)` (may raise ApiError) -> full decode -> RGB(+alpha) LoadedImage;
    truncated or corrupt data -> 422."""
    im = check_header(data, settings, num_images, name, scale, output_size)
    if admit is not None:
        admit(im.size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            return as_loaded(im, name)
    except ImageInputError as e:
        raise ApiError(422, str(e), "image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ApiError(422, f"{name}: cannot decode the image ({e})", "image") from None


def safe_name(filename: str | None) -> str:
    """A display name from the client's file name: last path part, harmless characters, bounded length."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._ -]", "_", base).strip(" .")[:100]
    return base or "image"


def download_name(input_name: str, index: int, count: int, scale: int | float | str = 4) -> str:
    """`my photo.jpg` -> `my_photo_x4.png` (`_2` ... for one of several images); no method tag, as ever.
    scale: a number (1.5 -> `_x1.5`) or a size tag (`options.size_tag`: `3840w`, `3840x2160`)."""
    stem = safe_name(input_name).rsplit(".", 1)[0].replace(" ", "_") or "image"
    return output_name(stem, scale, None, index, count)


def check_cost(name: str, size: tuple[int, int], cost: float, settings: ServerSettings) -> None:
    """413 when one job's cost (UNet megapixel-steps, engine/budget.job_cost) is over `max_job_cost`."""
    if cost > settings.max_job_cost:
        w, h = size
        raise ApiError(
            413,
            f"{name}: this job ({w}x{h}) costs {cost:.3g} megapixel-steps, over the limit of {settings.max_job_cost:g} "
            "(fewer steps, guidance <= 1, fewer images or a smaller image cost less)",
            "image",
            extra={"limit": settings.max_job_cost, "cost": round(cost, 3), "unit": "megapixel-steps"},
        )


def public_model_name(model: str) -> str:
    """What the service shows of the model: a Hub id as it is, a local folder by its last name only."""
    import os

    text = str(model)
    looks_local = text.startswith(("/", ".", "~")) or "\\" in text or (len(text) > 1 and text[1] == ":") or os.path.exists(text)
    if not looks_local:
        return text
    return re.split(r"[\\/]", text.rstrip("/\\"))[-1] or "model"

"""What sdx4 writes about its work, in one place: the metadata of an upscaled image (`UpscaleResult.metadata`,
stored as JSON in the PNG's "sdx4" chunk), what a written file adds to it, a comparison grid's, a batch
manifest record, the service's `/v1/info` and a quality report's settings.

Keys, their order and their values are part of the interface (scripts read them; tests pin them): add a key
here, never rename one. Pure functions of plain values; no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._version import __version__
from .imageio import LoadedImage, output_mode, profile_fits
from .options import GAN_METHODS, UpscaleOptions

#: The key every record carries: the sdx4 that wrote it.
VERSION_KEY = "sdx4_version"
#: The image's own fields that a batch manifest record repeats (when the upscale got that far).
MANIFEST_IMAGE_KEYS = ("input_size", "output_size", "device", "unet_dtype", "random_weights", "loras")


def image_metadata(options: UpscaleOptions, image: LoadedImage) -> dict[str, Any]:
    """What every upscaled image records, whatever the method: sizes, scale, and whether it had alpha."""
    w, h = image.size
    ow, oh = options.output_size((w, h))
    meta: dict[str, Any] = {
        VERSION_KEY: __version__,
        "method": options.method,
        # with width/height: the output's width / the input's (4 decimals), and "target" says what was asked
        "scale": options.scale if not options.has_target else round(ow / w, 4),
        "input_size": [w, h],
        "output_size": [ow, oh],
        "alpha": image.alpha is not None,
    }
    if options.has_target:
        meta["target"] = {"width": options.width, "height": options.height}
    if image.is_gray:  # only then: the records of colour inputs keep their keys
        meta["input_mode"] = image.mode
        meta["color_mode"] = options.color_mode
        meta["output_mode"] = output_mode(image, options.color_mode)
    if options.bit_depth != 8:
        meta["bit_depth"] = options.bit_depth
    if image.icc_profile:
        # True: the input's profile goes with the output, pixels unconverted; False: it could not (a grey
        # profile on an RGB output, with color_mode "rgb")
        meta["icc_profile"] = profile_fits(image.icc_profile, output_mode(image, options.color_mode))
    if image.exif:
        meta["exif"] = True  # the input's EXIF goes with the output, orientation set to 1
    if options.method != "sd" and options.method not in GAN_METHODS:
        meta["alpha_method"] = options.method  # a classical filter resizes the alpha plane too
    return meta


def classical_metadata(options: UpscaleOptions, image: LoadedImage, seconds: float) -> dict[str, Any]:
    """A classical filter's result: the image's fields and the time it took (0.1 ms)."""
    return {**image_metadata(options, image), "seconds": round(seconds, 4)}


def gan_metadata(options: UpscaleOptions, image: LoadedImage, run: Mapping[str, Any], *, alpha_filter: str) -> dict[str, Any]:
    """A Real-ESRGAN result: the image's fields, the network and its weights package (name, version), the
    runtime and threads, x4 passes, tiles, how alpha was resized, and the time (0.1 ms). A user's own weights
    (options.gan_weights): model_file is the file's name, weights_package/version are None, and
    weights_sha256 (the file's sha256, first 16 hex digits) and native_scale come after them."""
    meta = image_metadata(options, image)
    meta.update(
        model=run["model_name"],
        model_file=run["model_file"],
        weights_package=run["weights_package"],
        weights_version=run["weights_version"],
    )
    if "weights_sha256" in run:
        meta.update(weights_sha256=run["weights_sha256"], native_scale=run["native_scale"])
    meta.update(
        runtime=run["runtime"],
        threads=run["threads"],
        passes=run["passes"],
        tiling=dict(run["tiling"]),
    )
    if image.alpha is not None:
        meta["alpha_method"] = alpha_filter
    meta["seconds"] = round(run["seconds"], 4)
    return meta


def sd_metadata(
    options: UpscaleOptions,
    image: LoadedImage,
    model_info: Mapping[str, Any],
    *,
    passes: int,
    report: Mapping[str, Any],
    alpha_filter: str,
    allocator: str,
    seconds: float,
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """A diffusion result: the image's fields, every parameter (the seed included), the model and where it ran
    (`Upscaler.info`), how the last pass was tiled and decoded (`report`: its "tiling" and "vae_decode"),
    what the user asked for, the C allocator (part of the speed), and the times: the call to 1 ms, each
    stage to 0.1 ms."""
    meta = image_metadata(options, image)
    meta.update(
        prompt=options.prompt,
        negative_prompt=options.negative_prompt,
        seed=options.seed,
        steps=options.steps,
        guidance=options.guidance,
        noise_level=options.noise_level,
        eta=options.eta,
        num_images=options.num_images,
        scheduler=options.scheduler,
        preset=options.preset,  # None, or the preset the options were made from (UpscaleOptions.from_preset)
        **model_info,
    )
    meta.update(
        passes=passes,
        color_fix=options.color_fix,
        tiling=report["tiling"],
        vae_decode=report["vae_decode"],
        tiling_options={
            "tile_size": options.tile_size,
            "tile_overlap": options.tile_overlap,
            "tile_batch": options.tile_batch,
            "tile_blend": options.tile_blend,
            "max_memory": options.max_memory,
            "vae_attention_window": options.vae_attention_window,
        },
    )
    if image.alpha is not None:
        meta["alpha_method"] = alpha_filter
    meta["allocator"] = allocator
    meta["seconds"] = round(seconds, 3)
    meta["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return meta


def saved_metadata(metadata: Mapping[str, Any], input_name: str, job_id: str | None = None) -> dict[str, Any]:
    """What a written output carries: its result's metadata, the input's name and, from the service, the job."""
    meta = {**metadata, "input": input_name}
    if job_id is not None:
        meta["job_id"] = job_id
    return meta


def compare_metadata(
    *,
    input_name: str,
    input_size: tuple[int, int],
    alpha_ignored: bool,
    scale: int,
    methods: Sequence[str],
    labels: Sequence[str],
    crop: Sequence[int],
    crop_source: str,
    zoom: int,
    sd_options: UpscaleOptions | None,
    per_method: Mapping[str, Any],
    layout: Mapping[str, Any],
) -> dict[str, Any]:
    """A comparison grid (`sdx4 compare`): what is in each panel and how each method was run."""
    return {
        VERSION_KEY: __version__,
        "command": "compare",
        "input": input_name,
        "input_size": list(input_size),
        "alpha_ignored": alpha_ignored,
        "scale": scale,
        "methods": list(methods),
        "labels": list(labels),
        "crop": list(crop),
        "crop_source": crop_source,
        "zoom": zoom,
        "sd_options": sd_options.to_dict() if sd_options is not None else None,
        "per_method": dict(per_method),
        "layout": dict(layout),
    }


def manifest_record(
    *,
    input: str,
    outputs: Sequence[str],
    status: str,
    error: str | None,
    seed: int | None,
    base_seed: int,
    prompt_source: str,
    params: Mapping[str, Any],
    result_metadata: Mapping[str, Any],
    timings: Mapping[str, Any],
) -> dict[str, Any]:
    """One batch manifest line for an image: the job's fields, then those of MANIFEST_IMAGE_KEYS its result
    has, then the timings (the only part that differs between engines)."""
    record: dict[str, Any] = {
        "input": input,
        "outputs": list(outputs),
        "status": status,
        "error": error,
        "seed": seed,
        "base_seed": base_seed,
        "prompt_source": prompt_source,
        "params": dict(params),
        VERSION_KEY: __version__,
    }
    for key in MANIFEST_IMAGE_KEYS:
        if key in result_metadata:
            record[key] = result_metadata[key]
    record["timings"] = dict(timings)
    return record


def service_info(
    *,
    model: Mapping[str, Any],
    limits: Mapping[str, Any],
    methods: Sequence[str],
    choices: Mapping[str, Sequence[str]],
    defaults: Mapping[str, Any],
    api_key_required: bool,
    queue: Mapping[str, Any],
    loras: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The service's `/v1/info`: version, the model and where it runs, limits, choices and defaults, the queue,
    and the LoRAs merged into the served model (name, sha256 prefix, scale; [] for the base model)."""
    return {
        VERSION_KEY: __version__,
        "model": model,
        "limits": limits,
        "methods": list(methods),
        "choices": {k: list(v) for k, v in choices.items()},
        "defaults": defaults,
        "api_key_required": api_key_required,
        "queue": queue,
        "loras": [dict(r) for r in loras],
    }


def evaluate_settings(lr_method: str) -> dict[str, Any]:
    """A quality report's settings (`sdx4 evaluate`): the version and how the low-resolution inputs were made."""
    return {VERSION_KEY: __version__, "lr": lr_method}

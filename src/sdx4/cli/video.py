"""`sdx4 upscale clip.mp4 -o clip_x4.mp4`: video INPUTs go to sdx4.video (streamed, resumable chunks; see the
README's "Videos"). `cli/upscale.py` hands over here when every INPUT is a video. No torch or PyAV import here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..imageio import ImageInputError, output_name
from ..options import OptionsError
from .args import (
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    check_fits,
    load_options_from_args,
    load_or_report,
    options_from_args,
)

#: Flags that only mean something for video INPUTs, with their defaults.
VIDEO_DEFAULTS = {
    "video_codec": None,
    "crf": None,
    "pix_fmt": None,
    "chunk_frames": None,
    "no_audio": False,
}
EXIT_INTERRUPTED = 130


def add_video_args(p: argparse.ArgumentParser) -> None:
    from ..video import VIDEO_CODECS

    g = p.add_argument_group(
        "video INPUT (.mp4 .mov .mkv .webm .avi .m4v; resumable; see README 'Videos')"
    )
    g.add_argument(
        "--video-codec",
        choices=VIDEO_CODECS,
        default=None,
        help="output codec; default h264 (.mp4 .mov .m4v .mkv), vp9 (.webm); ffv1 = lossless archival in .mkv",
    )
    g.add_argument(
        "--crf",
        type=int,
        default=None,
        help="constant rate factor (lower = better, larger); default 18 h264, 20 h265, 30 vp9/av1",
    )
    g.add_argument(
        "--pix-fmt",
        default=None,
        metavar="FMT",
        help="encoded pixel format; default yuv420p (ffv1: yuv444p)",
    )
    g.add_argument(
        "--chunk-frames",
        type=int,
        default=None,
        metavar="N",
        help="frames per finished chunk in OUT.sdx4-parts/ (what a kill can lose); default 48",
    )
    g.add_argument(
        "--no-audio",
        action="store_true",
        help="drop the audio and subtitle streams (default: copied untouched)",
    )


def is_video_run(args: argparse.Namespace) -> bool:
    """True when every INPUT is a video file; UsageError for a mix of videos and images, or video flags without
    a video."""
    from ..video import is_video

    videos = [
        p for p in args.inputs if p != "-" and is_video(p) and not Path(p).is_dir()
    ]
    if not videos:
        given = [k for k, v in VIDEO_DEFAULTS.items() if getattr(args, k, v) != v]
        if given:
            raise UsageError(
                f"--{given[0].replace('_', '-')} only applies to video INPUTs (a folder run encodes its videos with the defaults)"
            )
        return False
    if len(videos) != len(args.inputs):
        raise UsageError(
            f"{videos[0]}: videos and images cannot be mixed in one command (a folder INPUT takes both)"
        )
    return True


def video_options_from_args(args: argparse.Namespace) -> Any:
    from ..video import VideoOptions

    values: dict[str, Any] = {
        "codec": args.video_codec,
        "crf": args.crf,
        "pix_fmt": args.pix_fmt,
        "keep_audio": not args.no_audio,
    }
    if args.chunk_frames is not None:
        values["chunk_frames"] = args.chunk_frames
    try:
        return VideoOptions(**values)
    except OptionsError as e:
        flag = {"codec": "--video-codec", "keep_audio": "--no-audio"}.get(
            e.option or "", f"--{(e.option or '').replace('_', '-')}"
        )
        raise UsageError(f"{flag}: {e}") from None


def video_output_paths(
    inputs: list[Path], output: str | None, method: str, scale: float | str
) -> list[Path]:
    """-o FILE (one input), -o FOLDER/, or beside each input as NAME_x4.SUFFIX (an .avi input: .mkv)."""
    from ..video import video_output_suffix

    def name(src: Path) -> str:
        return output_name(src.stem, scale, method, suffix=video_output_suffix(src))

    if output is None:
        return [src.with_name(name(src)) for src in inputs]
    out = Path(output)
    if output == "-":
        raise UsageError("-o -: a video cannot go to stdout; give an output file")
    if output.endswith("/") or out.is_dir() or out.suffix == "":
        if not out.is_dir():
            raise UsageError(f"{out}: the output folder does not exist")
        return [out / name(src) for src in inputs]
    if len(inputs) > 1:
        raise UsageError(f"-o {out}: several inputs need an output folder, not a file")
    return [out]


def cmd_video(args: argparse.Namespace) -> int:
    from ..video import (
        VideoCancelled,
        VideoMissingError,
        VideoRayError,
        parts_folder,
        plan_encoding,
        probe,
    )

    options = options_from_args(args)
    video = video_options_from_args(args)
    inputs = [Path(p) for p in args.inputs]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    outputs = video_output_paths(inputs, args.output, options.method_tag, options.size_tag)
    infos = []
    try:  # every clip and output checked before the model loads or a frame is upscaled
        from ..video import check_video_options

        check_video_options(object(), options)
        for src, dst in zip(inputs, outputs):
            info = probe(src)
            plan_encoding(dst, info, video, options.scale, options.output_size)
            if dst.exists() and not args.overwrite:
                raise UsageError(
                    f"{dst}: already exists (pass --overwrite to replace it)"
                )
            infos.append(info)
    except OptionsError as e:
        raise UsageError(f"--{(e.option or '').replace('_', '-')}: {e}") from None
    except ImageInputError as e:  # VideoInputError is one
        raise UsageError(str(e)) from None
    except VideoMissingError as e:  # PyAV not installed: say which extra to install
        print(f"sdx4: error: {e}", file=sys.stderr)
        return EXIT_FAILURE

    ray = _ray_settings(
        args, options
    )  # --engine ray: the workers load the model, not this process
    upscaler = None
    if options.method == "sd" and ray is None:
        upscaler = load_or_report(args, say, options)
        if upscaler is None:
            return EXIT_FAILURE
        for src, info in zip(inputs, infos):
            check_fits(upscaler, options, src, info.size)

    for src, dst, info in zip(inputs, outputs, infos):
        try:
            report = _run_one(
                upscaler, src, dst, options, video, info.frames, args.quiet, ray
            )
        except KeyboardInterrupt:
            print(
                f"sdx4: interrupted; the finished chunks are kept in {parts_folder(dst)}: run the same command "
                "again to continue",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        except VideoCancelled as e:
            print(f"sdx4: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except ImageInputError as e:
            raise UsageError(str(e)) from None
        except VideoRayError as e:
            print(f"sdx4: error: {e}", file=sys.stderr)
            return EXIT_FAILURE
        resumed = (
            f", {report.chunks_reused} of {report.chunks} chunks from an earlier run"
            if report.chunks_reused
            else ""
        )
        say(
            f"{src} -> {dst} ({report.output_size[0]}x{report.output_size[1]}, {report.frames} frames"
            + (
                f", seed {report.metadata.get('seed')}"
                if options.method == "sd"
                else ""
            )
            + f"{resumed})"
        )
        f = report.flicker
        if f:
            say(
                f"flicker {f['flicker']:.2f} (bicubic {f['bicubic_flicker']:.2f}, ratio {f['ratio']:.2f}"
                + ("" if f.get("warped", True) else ", unwarped: OpenCV missing")
                + ")"
            )
        else:
            say("flicker: not measured (frames from an earlier run were not seen again)")
    return EXIT_OK


def _run_one(
    upscaler: Any,
    src: Path,
    dst: Path,
    options: Any,
    video: Any,
    total: int,
    quiet: bool,
    ray: dict[str, Any] | None = None,
) -> Any:
    from ..video import upscale_video, upscale_video_ray

    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(
            total=total, desc=src.name, unit="frame", leave=False
        )  # frames with rate and ETA

    def progress(done: int, n: int) -> None:
        if bar is not None:
            bar.total = n
            bar.update(done - bar.n)

    try:
        if ray is not None:
            return upscale_video_ray(ray["load"], src, dst, options, video, workers=ray["workers"],
                                     address=ray["address"], gpus_per_worker=ray["gpus"], progress=progress)  # fmt: skip
        return upscale_video(upscaler, src, dst, options, video, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def _ray_settings(args: argparse.Namespace, options: Any) -> dict[str, Any] | None:
    """--engine ray for video INPUTs: the chunks of each clip spread over --workers Ray actors."""
    if getattr(args, "recursive", False) or getattr(args, "prompts", None):
        flag = "--recursive" if args.recursive else "--prompts"
        raise UsageError(f"{flag} only applies when INPUT is a folder")
    if getattr(args, "engine", "local") != "ray":
        given = [
            f
            for f in ("ray_address", "gpus_per_worker")
            if getattr(args, f, None) is not None
        ]
        if given or getattr(args, "workers", 1) != 1:
            flag = given[0].replace("_", "-") if given else "workers"
            raise UsageError(f"--{flag} only applies with --engine ray")
        return None
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1; got {args.workers}")
    load = load_options_from_args(args) if options.method == "sd" else None
    return {
        "load": load,
        "workers": args.workers,
        "address": args.ray_address,
        "gpus": args.gpus_per_worker or 0.0,
    }

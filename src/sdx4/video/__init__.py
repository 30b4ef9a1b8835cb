"""Videos: upscale a clip frame by frame, streamed and in resumable chunks, keeping its audio, subtitles,
chapters, timestamps, rotation and colour tags (`sdx4 upscale clip.mp4 -o clip_x4.mp4`).

    import sdx4, sdx4.video
    sdx4.video.upscale_video(None, "clip.mp4", "clip_x4.mp4", sdx4.UpscaleOptions(method="bicubic"))
    up = sdx4.load()
    report = sdx4.video.upscale_video(up, "clip.mp4", "clip_x4.mp4", sdx4.UpscaleOptions(seed=1),
                                      sdx4.video.VideoOptions(codec="h265", crf=20))

Needs PyAV: pip install -e ".[video]" (imported only when a clip is opened). Front ends import from here only.

Animations (animated GIF, WebP, APNG): `upscale_animation` (video/animation.py), every frame upscaled with one
seed, written back in their format (or MP4/WebM); `ANIMATION_TEMPORAL_MODES` (video/temporal.py). The flicker
measure: `FlickerMeter` (video/flicker.py).
"""

from .animation import AnimationResult, check_animation_options, upscale_animation
from .checks import Encoding, VideoInfo, plan_encoding, probe
from .distributed import VideoRayError, upscale_video_ray
from .errors import VIDEO_EXTRA, VideoCancelled, VideoInputError, VideoMissingError
from .flicker import FlickerMeter
from .options import (
    OUTPUT_CONTAINERS,
    TEMPORAL_MODES,
    VIDEO_CODECS,
    VIDEO_SUFFIXES,
    VideoOptions,
    is_video,
    output_container,
    video_output_suffix,
)
from .parts import parts_folder
from .run import VideoReport, check_video_options, read_video_metadata, upscale_video
from .temporal import TEMPORAL_MODES as ANIMATION_TEMPORAL_MODES

__all__ = [
    "ANIMATION_TEMPORAL_MODES",
    "OUTPUT_CONTAINERS",
    "TEMPORAL_MODES",
    "VIDEO_CODECS",
    "VIDEO_EXTRA",
    "VIDEO_SUFFIXES",
    "AnimationResult",
    "Encoding",
    "FlickerMeter",
    "VideoCancelled",
    "VideoInfo",
    "VideoInputError",
    "VideoMissingError",
    "VideoOptions",
    "VideoRayError",
    "VideoReport",
    "check_animation_options",
    "check_video_options",
    "is_video",
    "output_container",
    "parts_folder",
    "plan_encoding",
    "probe",
    "read_video_metadata",
    "upscale_animation",
    "upscale_video",
    "upscale_video_ray",
    "video_output_suffix",
]

"""Images in and out: reading any format Pillow reads into RGB/RGBA, and atomic writes with metadata.
The one owner of file names and formats: which suffixes are read as images, which are written, and what an
upscaled image is called (`output_name`).

Modules: `formats` (the formats read and written, output names), `read` (inputs -> LoadedImage), `write`
(outputs checked before work, then written atomically). No torch here: the classical path and the CLI's
validation use this package without loading torch.
"""

from .errors import ImageInputError, ImageOutputError
from .formats import (
    ALPHA_FORMATS,
    INPUT_FORMATS,
    INPUT_SUFFIXES,
    MAX_INPUT_PIXELS,
    MAX_STREAM_BYTES,
    METADATA_KEY,
    OUTPUT_FORMATS,
    OUTPUT_SUFFIXES,
    STREAM_WAIT_S,
    SUFFIXES_16_BIT,
    UPLOAD_FORMATS,
    human_size,
    is_input_image,
    numbered_name,
    output_format,
    output_name,
)
from .read import (
    EXIF_ORIENTATION,
    GRAY_MODES,
    LoadedImage,
    as_loaded,
    attach_alpha,
    check_bit_depth,
    decode_image,
    from_array,
    is_stream,
    normalise,
    open_image,
    output_mode,
    profile_fits,
    read_limited,
    read_metadata,
    read_stream,
    to_output_mode,
)
from .write import (
    check_output_alpha,
    check_output_bit_depth,
    check_output_folders,
    check_output_path,
    max_output_bytes,
    save_image,
    write_atomic,
    write_image,
)
from .animation import (
    ANIMATION_SUFFIXES,
    MAX_ANIMATION_FRAMES,
    MAX_ANIMATION_OUTPUT_PIXELS,
    AnimationInfo,
    VIDEO_OUTPUT_SUFFIXES,
    check_animation_path,
    is_animated,
    iter_frames,
    output_animation_format,
    probe_animation,
    read_animation_metadata,
    write_animation,
)

__all__ = [
    "ALPHA_FORMATS", "EXIF_ORIENTATION", "GRAY_MODES", "INPUT_FORMATS", "INPUT_SUFFIXES", "MAX_INPUT_PIXELS",
    "MAX_STREAM_BYTES", "METADATA_KEY", "OUTPUT_FORMATS", "OUTPUT_SUFFIXES", "STREAM_WAIT_S", "SUFFIXES_16_BIT",
    "UPLOAD_FORMATS", "ImageInputError", "ImageOutputError", "LoadedImage", "as_loaded", "attach_alpha",
    "check_bit_depth", "check_output_alpha", "check_output_bit_depth", "check_output_folders", "check_output_path",
    "decode_image", "from_array", "human_size", "is_input_image", "is_stream", "max_output_bytes", "normalise",
    "numbered_name", "open_image", "output_format", "output_mode", "output_name", "profile_fits", "read_limited",
    "read_metadata", "read_stream", "save_image", "to_output_mode", "write_atomic", "write_image",
    "ANIMATION_SUFFIXES", "MAX_ANIMATION_FRAMES", "MAX_ANIMATION_OUTPUT_PIXELS", "AnimationInfo", "VIDEO_OUTPUT_SUFFIXES", "check_animation_path", "is_animated",
    "iter_frames", "output_animation_format", "probe_animation", "read_animation_metadata", "write_animation",
]  # fmt: skip

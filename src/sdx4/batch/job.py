"""A folder job and its items: what to upscale, with which options and seed, and where outputs go."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..imageio import INPUT_SUFFIXES, output_name
from ..options import LoadOptions, LoraSpec, UpscaleOptions

MANIFEST_NAME = "sdx4-manifest.jsonl"
#: Files read as images (by suffix, case-insensitive; imageio owns the list); other files are skipped and reported.
IMAGE_SUFFIXES = INPUT_SUFFIXES
#: A prompt sidecar: `name.txt` next to `name.png`.
SIDECAR_SUFFIX = ".txt"
#: Temp files that `imageio.save_image` leaves only when the process is killed (SIGKILL) mid-write.
TEMP_FILE = re.compile(r"^\..+\.(png|jpg|jpeg|webp)\.[A-Za-z0-9_]+\.tmp$")

Status = Literal["ok", "failed", "skipped"]
Engine = Literal["local", "ray"]
Log = Callable[[str], None]


class BatchError(ValueError):
    """The job cannot start (bad folder, mapping, manifest, ...); the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# Names the OS allows but UTF-8 does not
# --------------------------------------------------------------------------------------------------

#: Set (true) on a manifest record whose `input` and `outputs` are shown escaped (see `shown_name`).
ESCAPED_KEY = "input_escaped"
_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|\\)")


def is_escaped(rel: str) -> bool:
    """Whether a name is not valid UTF-8: on Linux Python gives its undecodable bytes as surrogates."""
    return any("\ud800" <= ch <= "\udfff" for ch in rel)


def shown_name(rel: str) -> str:
    """A path as messages and the manifest show it: itself when it is valid UTF-8; otherwise each
    undecodable byte as `\\xNN` (`caf\\xe9.png` for the bytes b"caf\\xe9.png") and each backslash doubled,
    so that `real_name(shown_name(rel), True) == rel` (records carry ESCAPED_KEY to say which rule)."""
    if not is_escaped(rel):
        return rel
    out = []
    for ch in rel:
        if "\udc80" <= ch <= "\udcff":  # an undecodable byte (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif "\ud800" <= ch <= "\udfff":  # a lone surrogate from elsewhere (Windows names)
            out.append(f"\\u{ord(ch):04x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


def real_name(shown: str, escaped: bool) -> str:
    """The inverse of `shown_name`: the name on disk (with surrogate escapes) of a shown one."""
    if not escaped:
        return shown

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code == "\\":
            return "\\"
        return chr(0xDC00 + int(code[1:], 16)) if code[0] == "x" else chr(int(code[1:], 16))

    return _ESCAPE.sub(one, shown)


def record_input(record: dict[str, Any]) -> str:
    """The real name of a manifest record's input (records of escaped names carry ESCAPED_KEY)."""
    return real_name(record["input"], bool(record.get(ESCAPED_KEY)))


# --------------------------------------------------------------------------------------------------
# The job and its items
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchJob:
    """One batch run: every image under `input_dir` upscaled into the mirrored tree under `output_dir`.

    options: the parameters for every image; `prompt`/`negative_prompt` are the fallback when an image
      has no mapping entry and no sidecar, and `seed` is the BASE seed (None: drawn once per run and
      reused on resume) from which each image's own seed is derived.
    load: how the model is loaded (`sdx4.load(job.load)`; not used by the classical methods).
    recursive: also walk sub-folders (hidden files and folders, names starting with ".", are ignored).
    prompts_file: a CSV or JSONL mapping of relative path -> prompt [/ negative prompt].
    """

    input_dir: Path
    output_dir: Path
    options: UpscaleOptions = field(default_factory=UpscaleOptions)
    load: LoadOptions = field(default_factory=LoadOptions)
    recursive: bool = False
    prompts_file: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_dir", Path(self.input_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.prompts_file is not None:
            object.__setattr__(self, "prompts_file", Path(self.prompts_file))

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / MANIFEST_NAME


@dataclass(frozen=True)
class BatchItem:
    """One input image and everything needed to upscale it; plain data (it travels to Ray workers)."""

    input: str  # relative to the input folder, POSIX form
    outputs: tuple[str, ...]  # relative to the output folder, one per generated image
    options: UpscaleOptions  # this image's prompt and seed filled in
    prompt_source: str  # "mapping", "sidecar" or "option"
    base_seed: int
    model: str | None  # None for the classical methods (no model involved)
    loras: tuple[LoraSpec, ...] = ()  # the job's LoRAs (LoadOptions.loras) when the model is used

    @property
    def params(self) -> dict[str, Any]:
        """What decides the output: compared with the manifest to tell done from to-do. The LoRAs only when
        there are some (records written before LoRAs existed keep matching)."""
        lora = {"loras": [{"path": s.path, "scale": s.scale} for s in self.loras]} if self.loras else {}
        return {**self.options.to_dict(), "model": self.model, **lora}


@dataclass(frozen=True)
class BatchPlan:
    job: BatchJob
    base_seed: int
    items: tuple[BatchItem, ...]  # every image found, in sorted order
    todo: tuple[BatchItem, ...]  # those not done yet with the same parameters
    not_images: tuple[str, ...]  # other files (reported as skipped)
    new_skips: tuple[str, ...]  # of those, the ones the manifest does not list as skipped yet
    not_read: tuple[tuple[str, str], ...] = ()  # (path, reason): entries never read (plan.scan)
    new_not_read: tuple[tuple[str, str], ...] = ()  # of those, the ones the manifest does not list yet
    changed: tuple[str, ...] = ()  # done before, but the input's bytes changed since: redone

    @property
    def done(self) -> int:
        return len(self.items) - len(self.todo)


@dataclass
class BatchSummary:
    ok: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, error)
    skipped: list[str] = field(default_factory=list)  # not images
    not_read: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), see plan.scan
    already_done: int = 0
    base_seed: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def image_seed(base_seed: int, rel_path: str) -> int:
    """The seed of one image: sha256(f"{base_seed}:{rel_path}")[:4] as a big-endian int, 0..2**32-1.

    rel_path is the real name: a name that is not valid UTF-8 hashes as its bytes on disk."""
    digest = hashlib.sha256(f"{base_seed}:{rel_path}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "big")


def skip_message(rel: str, reason: str | None = None) -> str:
    """The `error` of a skipped entry's record: not an image (by suffix), or why it is not read."""
    if reason is None:
        reason = f"not an image (suffix {Path(rel).suffix or 'none'})"
    return f"{shown_name(rel)}: {reason}"


def output_names(rel_input: str, options: UpscaleOptions) -> tuple[str, ...]:
    """`sub/a.jpg` -> `sub/a_x4.png` (`_x4_bicubic` for classical methods; `_1`, `_2`... per image)."""
    parent, stem = os.path.split(rel_input)
    stem = os.path.splitext(stem)[0]
    n = options.num_images
    names = [output_name(stem, options.size_tag, options.method_tag, i, n) for i in range(n)]
    from ..video import is_video, video_output_suffix

    if is_video(rel_input):  # a video's output is one video, in its container (.avi: .mkv)
        names = [output_name(stem, options.size_tag, options.method_tag, suffix=video_output_suffix(rel_input))]
    return tuple(f"{parent}/{name}" if parent else name for name in names)

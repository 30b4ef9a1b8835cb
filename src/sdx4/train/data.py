"""Training data: find the high-res images (and low-res pairs, captions), check them before any work, and
make each sample's random crop and low-res input from its index alone (so a resumed run sees the same data).

Every random draw of sample `i` comes from `sample_rng(seed, i)` and the data order of an epoch from
`epoch_order(seed, epoch, n)`: no state to carry between steps besides the sample counter.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..imageio import ImageInputError, is_input_image, open_image
from .errors import TrainInputError
from .options import TrainOptions

SCALE = 4


@dataclass(frozen=True)
class Example:
    """One training image: its high-res file, the matching low-res file (pairs) and its prompt."""

    hr: Path
    lr: Path | None
    prompt: str
    size: tuple[int, int]  # high-res (width, height)


@dataclass(frozen=True)
class DataSet:
    examples: tuple[Example, ...]
    skipped: tuple[
        tuple[str, str], ...
    ]  # (file, why) for images that could not be read
    fingerprint: str  # sha256 of names, sizes and mtimes of every file used

    @property
    def prompts(self) -> list[str]:
        return sorted({e.prompt for e in self.examples})


def list_images(folder: Path, what: str) -> list[Path]:
    if not folder.exists():
        raise TrainInputError(f"{folder}: no such folder ({what})", path=folder)
    if not folder.is_dir():
        raise TrainInputError(f"{folder}: is not a folder ({what})", path=folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_input_image(p))
    if not files:
        raise TrainInputError(
            f"{folder}: holds no images ({what}); expected PNG, JPEG, WebP or TIFF files",
            path=folder,
        )
    return files


def read_captions(path: Path) -> dict[str, str]:
    """A captions file: CSV with a header `path,prompt` or JSONL lines {"path": ..., "prompt": ...} (the same
    spelling as folder runs' --prompts); `path` is the image's file name. Returns name -> prompt."""
    if not path.is_file():
        raise TrainInputError(f"{path}: captions file not found", path=path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainInputError(
            f"{path}: cannot read the captions file ({e})", path=path
        ) from None
    rows: list[dict[str, str]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or {"path", "prompt"} - set(reader.fieldnames):
            raise TrainInputError(
                f"{path}: a CSV captions file needs the header path,prompt; got {reader.fieldnames}",
                path=path,
            )
        rows = list(reader)
    elif path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainInputError(
                    f"{path} line {n}: not JSON ({e.msg})", path=path
                ) from None
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("path"), str)
                or not isinstance(obj.get("prompt"), str)
            ):
                raise TrainInputError(
                    f'{path} line {n}: needs {{"path": "...", "prompt": "..."}}',
                    path=path,
                )
            rows.append(obj)
    else:
        raise TrainInputError(
            f"{path}: captions must be a .csv or .jsonl file; got {path.suffix or 'no suffix'}",
            path=path,
        )
    return {Path(r["path"]).name: r["prompt"] or "" for r in rows}


def scan(
    hr_dir: Path,
    options: TrainOptions,
    pairs: Path | None = None,
    captions: Path | None = None,
    what: str = "training images",
) -> DataSet:
    """Read every image's size (unreadable ones are skipped and listed), match pairs and prompts, and refuse
    a set that cannot train: no image, none large enough for the crop, pairs that do not match."""
    files = list_images(hr_dir, what)
    mapping = read_captions(captions) if captions is not None else {}
    if mapping:
        unknown = sorted(set(mapping) - {f.name for f in files})
        if unknown:
            raise TrainInputError(
                f"{captions}: {len(unknown)} name(s) match no image in {hr_dir}, e.g. {unknown[0]}",
                path=captions,
            )
    lr_files: dict[str, Path] = {}
    if pairs is not None:
        lr_files = {p.stem: p for p in list_images(pairs, "low-res pairs")}
        missing = [f.name for f in files if f.stem not in lr_files]
        if missing:
            raise TrainInputError(
                f"{pairs}: no low-res image for {len(missing)} high-res image(s) of {hr_dir} (matched by name without "
                f"suffix), e.g. {missing[0]}",
                path=pairs,
            )
    examples, skipped, small = [], [], []
    for f in files:
        try:
            size = open_image(f).size
            lr_size = open_image(lr_files[f.stem]).size if pairs is not None else None
        except ImageInputError as e:
            skipped.append((str(f), str(e)))
            continue
        if lr_size is not None and (lr_size[0] * SCALE, lr_size[1] * SCALE) != size:
            raise TrainInputError(
                f"{lr_files[f.stem]}: {lr_size[0]}x{lr_size[1]} is not a quarter of its high-res pair {f} "
                f"({size[0]}x{size[1]}); pairs must differ by exactly 4x",
                path=lr_files[f.stem],
            )
        if min(size) < options.crop and not options.pad_small:
            small.append(f"{f.name} ({size[0]}x{size[1]})")
            continue
        sidecar = f.with_suffix(".txt")
        if f.name in mapping:
            prompt = mapping[f.name]
        elif sidecar.is_file():
            prompt = sidecar.read_text(encoding="utf-8").strip()
        else:
            prompt = ""
        examples.append(Example(f, lr_files.get(f.stem), prompt, size))
    if not examples:
        why = []
        if small:
            why.append(
                f"{len(small)} smaller than the {options.crop} px crop ({', '.join(small[:3])}{', ...' if len(small) > 3 else ''}): "
                "use a smaller --crop or --pad-small"
            )
        if skipped:
            why.append(f"{len(skipped)} unreadable ({skipped[0][1]})")
        raise TrainInputError(
            f"{hr_dir}: no usable {what}: {'; '.join(why)}", path=hr_dir
        )
    sidecars = [
        f.with_suffix(".txt") for f in files if f.with_suffix(".txt").is_file()
    ]  # prompts shape the run
    return DataSet(
        tuple(examples),
        tuple(skipped),
        fingerprint(files, lr_files.values(), sidecars, captions),
    )


def fingerprint(*groups: object) -> str:
    """sha256 over the name, size and mtime of every file (cheap; a changed file changes it)."""
    h = hashlib.sha256()
    for group in groups:
        paths = [group] if isinstance(group, Path) else list(group or ())  # type: ignore[arg-type]
        for p in sorted(paths):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def split(data: DataSet, count: int) -> tuple[DataSet, DataSet]:
    """Hold the last `count` examples (sorted by name) out for validation."""
    if count >= len(data.examples):
        raise TrainInputError(
            f"cannot hold out {count} validation image(s): only {len(data.examples)} usable training image(s)",
            path=None,
        )
    keep, held = (
        data.examples[: len(data.examples) - count],
        data.examples[len(data.examples) - count :],
    )
    return DataSet(keep, data.skipped, data.fingerprint), DataSet(
        held, (), data.fingerprint
    )


def sample_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for sample `index` of a run: stream 0 the data (numpy), 1 the noise (torch.Generator)."""
    return int(
        np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0]
    ) & (2**63 - 1)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x0DA7A, epoch]).permutation(n)


def example_index(seed: int, index: int, n: int) -> int:
    """Which example global sample `index` uses: every image once per epoch, in a seeded order."""
    return int(epoch_order(seed, index // n, n)[index % n])


def pad_to(image: np.ndarray, side: int) -> np.ndarray:
    """Pad H,W,3 on the bottom/right (reflect, edge where too small) to at least side x side."""
    h, w = image.shape[:2]
    ph, pw = max(0, side - h), max(0, side - w)
    while ph or pw:
        rh, rw = min(ph, image.shape[0] - 1), min(pw, image.shape[1] - 1)
        if rh == rw == 0:
            return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="edge")
        image = np.pad(image, ((0, rh), (0, rw), (0, 0)), mode="reflect")
        ph, pw = ph - rh, pw - rw
    return image


def bicubic_down(image: Image.Image) -> Image.Image:
    """Antialiased bicubic /4 (Pillow's resize filters scale their support when reducing)."""
    return image.resize(
        (image.width // SCALE, image.height // SCALE), Image.Resampling.BICUBIC
    )


def realistic_down(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur (sigma 0.2-2 px), bicubic /4, Gaussian noise (0-8/255), JPEG (quality 40-95): a light version of
    Real-ESRGAN's first-order degradation, for low-res inputs that are not clean downsamples."""
    blurred = image.filter(
        ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 2.0)))
    )
    small = np.asarray(bicubic_down(blurred), dtype=np.float32)
    small = small + rng.normal(0.0, float(rng.uniform(0.0, 8.0)), size=small.shape)
    noisy = Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format="JPEG", quality=int(rng.integers(40, 96)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def make_sample(
    example: Example, options: TrainOptions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random crop of `example` and its low-res input: (crop,crop,3) and (crop/4,crop/4,3) uint8."""
    hr = np.asarray(open_image(example.hr).rgb)
    lr = np.asarray(open_image(example.lr).rgb) if example.lr is not None else None
    c = options.crop
    if lr is not None:  # pad both on the low-res grid: the pair stays aligned
        lr = pad_to(lr, c // SCALE)
        hr = _pad_exact(hr, SCALE * lr.shape[0], SCALE * lr.shape[1])
    else:
        hr = pad_to(hr, c)
    h, w = hr.shape[:2]
    # Crops start on the low-res grid (multiples of 4) so that a pair's low-res crop is exact.
    y = int(rng.integers(0, (h - c) // SCALE + 1)) * SCALE
    x = int(rng.integers(0, (w - c) // SCALE + 1)) * SCALE
    crop = hr[y : y + c, x : x + c]
    if lr is not None:
        small = lr[y // SCALE : (y + c) // SCALE, x // SCALE : (x + c) // SCALE]
    elif options.degradation == "realistic":
        small = np.asarray(realistic_down(Image.fromarray(crop), rng))
    else:
        small = np.asarray(bicubic_down(Image.fromarray(crop)))
    return np.array(crop), np.array(small)  # writable copies (torch.from_numpy)


def _pad_exact(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """H,W,3 padded (as pad_to) to exactly h x w (a high-res image to 4x its padded low-res pair)."""
    return pad_to(image, max(h, w))[:h, :w]


def center_sample(
    example: Example, options: TrainOptions
) -> tuple[np.ndarray, np.ndarray]:
    """The validation sample of `example`: its centre crop (at most the crop size) and its low-res input
    (the pair's, or bicubic /4: validation is deterministic)."""
    hr = np.asarray(open_image(example.hr).rgb)
    lr = np.asarray(open_image(example.lr).rgb) if example.lr is not None else None
    c = options.crop
    if lr is not None:
        lr = pad_to(lr, c // SCALE)
        hr = _pad_exact(hr, SCALE * lr.shape[0], SCALE * lr.shape[1])
    else:
        hr = pad_to(hr, c)
    h, w = hr.shape[:2]
    y, x = (h - c) // 2 // SCALE * SCALE, (w - c) // 2 // SCALE * SCALE
    crop = np.ascontiguousarray(hr[y : y + c, x : x + c])
    if lr is not None:
        return crop, np.array(
            lr[y // SCALE : (y + c) // SCALE, x // SCALE : (x + c) // SCALE]
        )
    return crop, np.array(bicubic_down(Image.fromarray(crop)))

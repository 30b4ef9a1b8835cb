"""Side-by-side comparison grid: the input (nearest-enlarged) and each method's output, plus zoomed crops.

    +--------------------+--------------------+-----+
    | input (nearest x4) | bicubic            | ... |   label strip
    | [full, crop boxed] | [full output]      | ... |   row 1: every tile is exactly scale*W x scale*H
    | zoomed crop: x=.. y=.. 16x16 input px, shown 16x |   caption
    | [crop, nearest xZ] | [crop, nearest xZ] | ... |   row 2: the same region of each tile, enlarged
    +--------------------+--------------------+-----+

Method tiles are the method outputs pixel for pixel (nothing drawn on them); only the input tile
carries the red box that marks the zoomed region. The crop is given in INPUT pixels (x, y, w, h);
"auto" picks the square whose inside has the most local variance (most fine detail).

Pure functions on PIL images / numpy arrays; no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .metrics import rgb_to_y

Box = tuple[int, int, int, int]  # x, y, w, h

#: Side of the square window whose variance measures local detail for the auto crop.
DETAIL_WINDOW = 5
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
BOX_COLOUR = (255, 0, 0)


def default_crop_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """A square of a quarter of the shorter side (at least 8 px, at most the image)."""
    w, h = input_size
    side = min(max(8, min(w, h) // 4), w, h)
    return side, side


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row/column: S[i, j] = a[:i, :j].sum()."""
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    s[1:, 1:] = a.cumsum(0).cumsum(1)
    return s


def _box_sums(a: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Sum of every kh x kw window of a (valid positions): H,W -> H-kh+1, W-kw+1."""
    s = _integral(a)
    return s[kh:, kw:] - s[:-kh, kw:] - s[kh:, :-kw] + s[:-kh, :-kw]


def local_variance(grey: np.ndarray, window: int = DETAIL_WINDOW) -> np.ndarray:
    """Variance of every window x window patch: H,W -> H-window+1, W-window+1 (valid positions)."""
    g = grey.astype(np.float64)
    n = window * window
    mean = _box_sums(g, window, window) / n
    return np.maximum(_box_sums(g * g, window, window) / n - mean**2, 0.0)


def auto_crop(rgb: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> Box:
    """The crop (x, y, w, h) of `size` whose inside holds the most local variance of luma.

    Each DETAIL_WINDOW-square patch entirely inside the crop contributes its variance, so fine
    texture and edges count, a smooth gradient does not. Ties go to the top-most, then left-most.
    """
    arr = np.asarray(rgb.convert("RGB") if isinstance(rgb, Image.Image) else rgb)
    h, w = arr.shape[:2]
    cw, ch = size if size is not None else default_crop_size((w, h))
    if not (1 <= cw <= w and 1 <= ch <= h):
        raise ValueError(f"crop size {cw}x{ch} does not fit in the {w}x{h} image")
    k = DETAIL_WINDOW
    if cw < k or ch < k:  # too small to measure detail: take the centre
        return (w - cw) // 2, (h - ch) // 2, cw, ch
    var = local_variance(rgb_to_y(arr), k)  # h-k+1, w-k+1
    score = _box_sums(var, ch - k + 1, cw - k + 1)  # h-ch+1, w-cw+1: detail inside the crop at (y, x)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(x), int(y), cw, ch


def parse_crop(text: str, input_size: tuple[int, int]) -> Box | None:
    """'auto' -> None; 'x,y,w,h' (input pixels) -> a box checked against the image size."""
    if text.strip().lower() == "auto":
        return None
    parts = text.split(",")
    try:
        x, y, cw, ch = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"crop must be 'auto' or four integers x,y,w,h; got {text!r}") from None
    w, h = input_size
    if cw < 1 or ch < 1 or x < 0 or y < 0 or x + cw > w or y + ch > h:
        raise ValueError(f"crop {x},{y},{cw},{ch} is not inside the {w}x{h} input (x,y >= 0, w,h >= 1, x+w <= {w}, y+h <= {h})")
    return x, y, cw, ch


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes; boxes are (x, y, w, h) in grid pixels, one per panel (input first)."""

    size: tuple[int, int]
    scale: int
    crop: Box  # in input pixels
    zoom: int  # nearest-neighbour factor applied to the crop of each (already upscaled) tile
    font_size: int
    label_boxes: list[Box]
    tile_boxes: list[Box]
    caption_box: Box
    zoom_boxes: list[Box]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def plan_grid(n_panels: int, input_size: tuple[int, int], scale: int, crop: Box) -> GridLayout:
    """Pure geometry of the grid for n_panels columns (input + methods)."""
    w, h = input_size
    tw, th = scale * w, scale * h  # one full tile
    _, _, cw, ch = crop
    zoom = max(1, min(tw // (scale * cw), th // (scale * ch)))
    zw, zh = scale * cw * zoom, scale * ch * zoom
    gap = max(4, tw // 64)
    font_size = int(min(40, max(10, tw // 14)))
    lh = round(font_size * 1.5)  # label strip height
    col_w = max(tw, zw)
    width = gap + n_panels * (col_w + gap)
    y_tiles = gap + lh
    y_caption = y_tiles + th + gap
    y_zoom = y_caption + lh
    height = y_zoom + zh + gap
    xs = [gap + i * (col_w + gap) for i in range(n_panels)]
    return GridLayout(
        size=(width, height),
        scale=scale,
        crop=crop,
        zoom=zoom,
        font_size=font_size,
        label_boxes=[(x, gap, col_w, lh) for x in xs],
        tile_boxes=[(x, y_tiles, tw, th) for x in xs],
        caption_box=(gap, y_caption, width - 2 * gap, lh),
        zoom_boxes=[(x, y_zoom, zw, zh) for x in xs],
    )


def label_image(text: str, size: tuple[int, int], font_size: int) -> Image.Image:
    """A strip of `size` with `text` in Pillow's default font, left-aligned, clipped to the strip."""
    strip = Image.new("RGB", size, BACKGROUND)
    font = ImageFont.load_default(size=font_size)
    ImageDraw.Draw(strip).text((2, max(0, (size[1] - font_size) // 2)), text, fill=TEXT_COLOUR, font=font)
    return strip


def enlarge_nearest(image: Image.Image, scale: int) -> Image.Image:
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def zoom_crop(tile: Image.Image, crop: Box, scale: int, zoom: int) -> Image.Image:
    """The input-pixel `crop` of an upscaled tile, enlarged `zoom` times with nearest neighbour."""
    x, y, cw, ch = crop
    region = tile.crop((scale * x, scale * y, scale * (x + cw), scale * (y + ch)))
    return enlarge_nearest(region, zoom)


def caption_text(crop: Box, scale: int, zoom: int) -> str:
    x, y, cw, ch = crop
    return f"zoomed crop: x={x} y={y} {cw}x{ch} input px, shown {scale * zoom}x"


def build_grid(
    input_rgb: Image.Image, panels: list[tuple[str, Image.Image]], scale: int, crop: Box
) -> tuple[Image.Image, GridLayout]:
    """The grid image and its layout. `panels` are (label, output) with outputs exactly scale x the input."""
    w, h = input_rgb.size
    for label, out in panels:
        if out.size != (scale * w, scale * h):
            raise ValueError(f"{label}: output is {out.width}x{out.height}, expected {scale * w}x{scale * h}")
    tiles = [("input (nearest x%d)" % scale, enlarge_nearest(input_rgb.convert("RGB"), scale))]
    tiles += [(label, out.convert("RGB")) for label, out in panels]
    layout = plan_grid(len(tiles), (w, h), scale, crop)
    grid = Image.new("RGB", layout.size, BACKGROUND)
    for i, (label, tile) in enumerate(tiles):
        lx, ly, lw, lh = layout.label_boxes[i]
        grid.paste(label_image(label, (lw, lh), layout.font_size), (lx, ly))
        grid.paste(zoom_crop(tile, crop, scale, layout.zoom), layout.zoom_boxes[i][:2])
        if i == 0:  # mark the zoomed region on the input only; method tiles stay untouched
            tile = tile.copy()
            x, y, cw, ch = crop
            ImageDraw.Draw(tile).rectangle(
                (scale * x, scale * y, scale * (x + cw) - 1, scale * (y + ch) - 1),
                outline=BOX_COLOUR,
                width=max(1, scale // 2),
            )
        grid.paste(tile, layout.tile_boxes[i][:2])
    cx, cy, cw_, ch_ = layout.caption_box
    grid.paste(label_image(caption_text(crop, scale, layout.zoom), (cw_, ch_), layout.font_size), (cx, cy))
    return grid, layout

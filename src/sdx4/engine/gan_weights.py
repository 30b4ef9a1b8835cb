"""A user's own Real-ESRGAN-family weights: a .pth or .safetensors file of an RRDBNet or SRVGGNetCompact
(engine/gan_arch.py), run by PyTorch on the CPU in fp32 (method "realesrgan" with `gan_weights`).

Reading is safe: .pth through `torch.load(weights_only=True)` (no pickled code runs), .safetensors through
safetensors. BasicSR's wrappers {"params_ema": ...} / {"params": ...} are unwrapped (params_ema first, as
Real-ESRGAN's own inference does). Anything else is refused before any image work, naming the file and what
it holds. A file is read once per process (cached by path, size and mtime): folder runs reuse the net.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..options import OptionsError

#: The file kinds read; anything else is refused by its suffix before it is opened.
SUFFIXES = (".pth", ".pt", ".safetensors")
#: BasicSR's checkpoint wrappers, in the order Real-ESRGAN's inference prefers them.
WRAPPERS = ("params_ema", "params")
#: How much of the file's sha256 the metadata records (hex digits).
SHA_DIGITS = 16


def refuse(path: Path | str, why: str) -> OptionsError:
    return OptionsError(f"gan_weights {path}: {why}", option="gan_weights")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a .pth / .safetensors file, wrappers removed; OptionsError (option "gan_weights")
    naming the file when it is missing, of another kind, truncated or not a dict of tensors."""
    import torch

    if not path.exists():
        raise refuse(path, "no such file")
    if not path.is_file():
        raise refuse(path, "not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise refuse(path, f"expected a .pth or .safetensors file of an RRDBNet or SRVGGNetCompact; got {suffix or 'no suffix'!r}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError on a truncated or foreign file
            raise refuse(path, f"not a readable .safetensors file (truncated or of another kind): {_first_line(e)}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle with code in it (weights_only), not a torch file
            raise refuse(path, f"not a readable PyTorch weights file (truncated, or it holds more than tensors): {_first_line(e)}") from None
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise refuse(path, f"it holds {type(obj).__name__}, not a dict of tensors (a state dict)")
    odd = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise refuse(path, f"key {odd!r} holds {type(obj[odd]).__name__}, not a tensor: not a state dict"
                     + (" (a training checkpoint? only 'params_ema' / 'params' wrappers are unwrapped)" if obj else ""))
    return obj


@dataclass(frozen=True)
class UserNet:
    """A user's network, loaded: the module, what it is, and the file it came from."""

    net: Any  # torch.nn.Module, fp32, eval mode
    spec: Any  # gan_arch.NetSpec
    file_name: str
    sha256: str  # the whole file's, hex

    @property
    def scale(self) -> int:
        return int(self.spec.scale)


def load_user_net(path: str | Path) -> UserNet:
    """The network in `path`, built and loaded (cached per path, size and modification time)."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        read_state_dict(p)  # raises the "no such file" / "not a file" message
        raise
    return _load(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _load(path: str, size: int, mtime_ns: int) -> UserNet:
    from .gan_arch import ArchError, detect, load

    p = Path(path)
    sd = read_state_dict(p)
    import torch

    try:
        spec = detect(sd)
        net = load(sd, spec)
    except ArchError as e:
        raise refuse(p, f"not a Real-ESRGAN-family network: {e}") from None
    # channels_last: measured 8% faster for x4plus and 14-35% for the smaller nets on a CPU (README)
    return UserNet(net.to(memory_format=torch.channels_last), spec, p.name, file_sha256(p))


def forward(user: UserNet, rgb: Any) -> Any:
    """One pass: float32 H,W,3 in [0,1] -> float32 sH,sW,3 (s = the net's scale; not clipped).

    An x2 / x1 RRDBNet pixel-unshuffles by 2 / 4, so the input is padded (reflected, bottom and right) to a
    multiple of that and the output cropped back, as Real-ESRGAN's inference does."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    h, w, _ = rgb.shape
    s = user.scale
    multiple = 4 // s if user.spec.arch == "RRDBNet" else 1
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))[None]  # 1,3,H,W
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs the image larger than the pad
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    x = x.contiguous(memory_format=torch.channels_last)  # as the net's weights
    with torch.inference_mode():
        y = user.net(x)[:, :, : s * h, : s * w]  # 1,3,sH,sW
    out = y[0].permute(1, 2, 0).contiguous().numpy()
    if out.shape != (s * h, s * w, 3):
        raise RuntimeError(f"the network returned {out.shape}, expected ({s * h}, {s * w}, 3)")
    return out

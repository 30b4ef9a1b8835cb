"""Running a planned decode: whole-image planes (in RAM or spilled to unlinked temporary files), the tile
runner, and the windowed mid-block attention."""


from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import tempfile
import weakref
from typing import Any

import torch

from .ops import (
    QUERY_CHUNK,
    Moments,
    Op,
    apply_affine_,
    attend,
    attention_op,
    from_tokens,
    group_norm_affine,
    to_tokens,
)
from .plan import DecodePlan, attention_bounds, op_shapes, scale_at

# ----------------------------------------------------------------------------------------------------------
# Execution


class Plane:
    """A whole-image tensor B,C,H,W on the CPU (in RAM, or in an unlinked temporary file) and its moments.

    A spilled plane is a file laid out B,H,W,C (so a tile window is a few contiguous runs), written with
    pwrite (`write`) and read through a shared mapping (`crop`); `release()` drops the mapping's pages from
    this process's resident set after each tile (MADV_DONTNEED keeps the data: it is in the file / page
    cache, which the kernel writes back and evicts under memory pressure). Writes do not go through the
    mapping: filling a shared file mapping page by page cost 12-20 s of kernel time per 4 GiB here (ext4),
    pwrite 2.4 s; and a full disk is then an OSError naming the directory, not a SIGBUS.
    """

    def __init__(
        self,
        data: torch.Tensor,
        moments: Moments | None = None,
        mapping: mmap.mmap | None = None,
        fmt: torch.memory_format = torch.contiguous_format,
        fd: int | None = None,
        where: str | None = None,
    ) -> None:
        self.data = data
        self.moments = moments
        self._mapping = mapping
        self.fmt = fmt  # the layout of crops (the decoder's convolutions' layout: no conversion per tile)
        self._fd, self._where = fd, where
        if fd is not None:
            weakref.finalize(self, os.close, fd)

    @classmethod
    def empty(
        cls,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        spill_dir: str | None,
        fmt: torch.memory_format = torch.contiguous_format,
    ) -> Plane:
        if spill_dir is None:
            return cls(torch.empty(shape, dtype=dtype, memory_format=fmt), fmt=fmt)
        b, c, h, w = shape
        nbytes = b * c * h * w * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="sdx4-vae-", suffix=".plane", dir=spill_dir)
        try:
            os.unlink(path)  # the descriptor and mapping keep the file alive; it disappears with the plane
            os.ftruncate(fd, nbytes)
            # writable only because torch.frombuffer warns on read-only buffers: writes go through `write`
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        data = torch.frombuffer(mapping, dtype=dtype).view(b, h, w, c).permute(0, 3, 1, 2)  # B,C,H,W view
        return cls(data, None, mapping, fmt, fd, spill_dir)

    def crop(self, y0: int, y1: int, x0: int, x1: int, device: torch.device) -> torch.Tensor:
        """A private copy of data[:, :, y0:y1, x0:x1] on `device`, laid out as `fmt`."""
        return self.data[:, :, y0:y1, x0:x1].to(device, memory_format=self.fmt, copy=True)

    def write(self, y0: int, x0: int, t: torch.Tensor) -> None:
        """data[:, :, y0:y0+h, x0:x0+w] = t (B,C,h,w)."""
        if self._fd is None:
            self.data[:, :, y0 : y0 + t.shape[2], x0 : x0 + t.shape[3]] = t
            return
        b, c, h, w = self.data.shape
        rows = t.to(self.data.device, self.data.dtype).permute(0, 2, 3, 1)  # B,h,w,C: each row one run
        if rows.stride(3) != 1 or rows.stride(2) != c:
            rows = rows.contiguous()
        raw = rows.view(torch.uint8).numpy()  # (any dtype, bf16 too) B,h,w,C*itemsize
        run, e = raw.shape[2] * raw.shape[3], self.data.element_size()
        whole = x0 == 0 and raw.shape[2] == w and raw.strides[1] == run  # full-width rows: one block each
        try:
            for i in range(b):
                if whole:
                    self._pwrite(raw[i], ((i * h + y0) * w) * c * e)
                    continue
                for r in range(raw.shape[1]):
                    self._pwrite(raw[i, r], ((i * h + y0 + r) * w + x0) * c * e)
        except OSError as err:
            raise OSError(
                err.errno,
                f"tiled VAE decode: writing a whole-image tensor ({self.data.numel() * e / 2**30:.2f} GiB) to a "
                f"temporary file in {self._where!r} failed: {err.strerror}. Free disk space there, point TMPDIR "
                "(or spill_dir) at a disk with room, or give the decode more memory (--max-memory)",
            ) from err

    def add_(self, y0: int, x0: int, t: torch.Tensor) -> None:
        """data[:, :, y0:y0+h, x0:x0+w] += t (B,C,h,w)."""
        y1, x1 = y0 + t.shape[2], x0 + t.shape[3]
        if self._fd is None:
            self.data[:, :, y0:y1, x0:x1] += t.to(self.data.device)
        else:
            self.write(y0, x0, self.crop(y0, y1, x0, x1, t.device) + t)

    def _pwrite(self, block: Any, offset: int) -> None:
        view = memoryview(block).cast("B")
        while view:
            n = os.pwrite(self._fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            view, offset = view[n:], offset + n

    def release(self) -> None:
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED)


def blend_ramp(start: int, end: int, n: int, overlap: int) -> torch.Tensor:
    """Blend weights along one axis of a window [start, end) of 0..n: linear over the 2*overlap pixels it
    shares with a neighbour (sums to one with the neighbour's opposite ramp), 1 elsewhere and at image edges."""
    p = torch.arange(start, end, dtype=torch.float64) + 0.5
    w = torch.ones(end - start, dtype=torch.float64)
    if overlap > 0 and start > 0:
        w = torch.minimum(w, (p - start) / (2 * overlap))
    if overlap > 0 and end < n:
        w = torch.minimum(w, (end - p) / (2 * overlap))
    return w


def window_spans(n: int, bounds: tuple[int, ...], halo: int) -> list[tuple[int, int, int, int]]:
    """(window start, window end, core start, core end) per part of 0..n; windows clipped to the image."""
    return [(max(0, a - halo), min(n, b + halo), a, b) for a, b in itertools.pairwise(bounds)]


class Runner:
    def __init__(
        self,
        ops: list[Op],
        plan: DecodePlan,
        device: torch.device,
        dtype: torch.dtype,
        spill_dir: str | None,
        fmt: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.ops, self.plan, self.device, self.dtype = ops, plan, device, dtype
        self.spill_dir = spill_dir  # None: whole-image tensors in RAM
        self.store = torch.device("cpu")
        self.shapes = op_shapes(ops)
        #: Planes and crops in the layout of the decoder's convolution weights (channels-last on the CPU):
        #: contiguous crops would be converted by every convolution and converted back when stored.
        self.fmt = fmt

    # -- plane mode ---------------------------------------------------------------------------------------
    def plane_op(self, i: int, cur: Plane, res: Plane | None) -> Plane:
        """ops[i] over whole-image tensors, tile by tile (each tile with the op's own halo): exact."""
        op, sc = self.ops[i], scale_at(self.shapes, i)
        rows = tuple(r * sc for r in self.plan.rows)
        cols = tuple(c * sc for c in self.plan.cols)
        affine = group_norm_affine(op.norm, cur.moments, self.device, self.dtype) if op.norm is not None else None
        # the decoded image itself, and the planes the plan holds in RAM, are not spilled
        where = None if (i == len(self.ops) - 1 or i in self.plan.ram_planes) else self.spill_dir
        if op.kind == "attention":
            if self.plan.attention == "global":
                return self._global_attention(op, cur, affine, where)
            return self._local_attention(op, cur, affine, self.plan.attn_rows, self.plan.attn_cols, where)
        halo = op.halo
        b, _, hh, ww = cur.data.shape
        u = op.up
        out = Plane.empty((b, op.out_channels, hh * u, ww * u), self.dtype, where, self.fmt)
        moments = Moments()
        for y0, y1, cy0, cy1 in window_spans(hh, rows, halo):
            for x0, x1, cx0, cx1 in window_spans(ww, cols, halo):
                t = apply_affine_(cur.crop(y0, y1, x0, x1, self.device), affine)  # B,C,wh,ww normalised
                if op.skip:
                    o = op.fn(t, res.crop(y0, y1, x0, x1, self.device))
                else:
                    o = op.fn(t)
                core = o[:, :, (cy0 - y0) * u : (cy1 - y0) * u, (cx0 - x0) * u : (cx1 - x0) * u]
                out.write(cy0 * u, cx0 * u, core)
                moments.add(core)
                del t, o, core
                for plane in (cur, res, out):
                    if plane is not None:
                        plane.release()
        out.moments = moments
        return out

    def _local_attention(
        self, op: Op, cur: Plane, affine: tuple, rows: tuple[int, ...], cols: tuple[int, ...], where: str | None
    ) -> Plane:
        """Attention within each window (core + overlap; `attention_bounds`), blended with feathered weights.

        Neighbouring windows overlap by 2*overlap pixels; linear ramps across that band sum to one, so the
        attention output changes smoothly from one tile's to the next (no seam at core boundaries). Windows
        that cover the whole latent give exactly the global result.
        """
        attn, ov = op.attn, self.plan.overlap
        b, c, hh, ww = cur.data.shape
        acc = Plane.empty((b, c, hh, ww), self.dtype, where, self.fmt)  # weighted sum of attention outputs
        if acc._mapping is None:
            acc.data.zero_()  # (a new file mapping reads as zeros)
        wsum = torch.zeros(hh, ww, dtype=torch.float64)
        for y0, y1, cy0, cy1 in window_spans(hh, rows, ov):
            for x0, x1, cx0, cx1 in window_spans(ww, cols, ov):
                t = to_tokens(apply_affine_(cur.crop(y0, y1, x0, x1, self.device), affine))
                o = from_tokens(attend(attn, t, t), y1 - y0, x1 - x0)  # B,C,wh,ww
                weight = blend_ramp(y0, y1, hh, ov)[:, None] * blend_ramp(x0, x1, ww, ov)[None, :]  # wh,ww
                wsum[y0:y1, x0:x1] += weight
                acc.add_(y0, x0, o.mul_(weight.to(o.device, o.dtype)))
                del t, o
                cur.release()
                acc.release()
        moments = Moments()
        for y0, y1, _, _ in window_spans(hh, rows, 0):
            for x0, x1, _, _ in window_spans(ww, cols, 0):
                o = acc.crop(y0, y1, x0, x1, self.device) / wsum[y0:y1, x0:x1].to(self.device, self.dtype)
                o = (o + cur.crop(y0, y1, x0, x1, self.device)) / attn.rescale_output_factor  # residual
                acc.write(y0, x0, o)
                moments.add(o)
                cur.release()
                acc.release()
        acc.moments = moments
        return acc

    def _global_attention(self, op: Op, cur: Plane, affine: tuple, where: str | None) -> Plane:
        """Single-head self-attention over ALL latent pixels; keys/values for the whole image, queries in chunks."""
        attn = op.attn
        b, c, hh, ww = cur.data.shape
        rows_per_chunk = max(1, QUERY_CHUNK // ww)
        bands = [(y, min(hh, y + rows_per_chunk)) for y in range(0, hh, rows_per_chunk)]
        keys, values = [], []
        for y0, y1 in bands:
            t = to_tokens(apply_affine_(cur.crop(y0, y1, 0, ww, self.device), affine))  # B,n,C
            keys.append(attn.to_k(t))
            values.append(attn.to_v(t))
            cur.release()
        kv = (torch.cat(keys, 1), torch.cat(values, 1))  # B,N,C each, N = every latent pixel
        del keys, values
        out = Plane.empty((b, c, hh, ww), self.dtype, where, self.fmt)
        moments = Moments()
        for y0, y1 in bands:
            t = to_tokens(apply_affine_(cur.crop(y0, y1, 0, ww, self.device), affine))
            o = from_tokens(attend(attn, t, kv=kv), y1 - y0, ww)
            o = (o + cur.crop(y0, y1, 0, ww, self.device)) / attn.rescale_output_factor
            out.write(y0, 0, o)
            moments.add(o)
            cur.release()
            out.release()
        out.moments = moments
        return out

    # -- tile mode ----------------------------------------------------------------------------------------
    def tile_group(
        self,
        tiles: list[int],
        cur: Plane,
        res: Plane | None,
        table: dict[int, tuple],
        out: torch.Tensor,
    ) -> None:
        """Run ops[split:] on the given tiles in lockstep; norms missing from `table` get the group's pooled stats."""
        plan, ops, k = self.plan, self.ops, self.plan.split
        sc, total = scale_at(self.shapes, k), scale_at(self.shapes, len(ops))
        nx = len(plan.cols) - 1
        hh, ww = cur.data.shape[2:]
        state = []  # per tile: [current B,C,h,w, residual or None, core box (y0, y1, x0, x1) in the window]
        for t in tiles:
            r, c = divmod(t, nx)
            cy0, cy1 = plan.rows[r] * sc, plan.rows[r + 1] * sc
            cx0, cx1 = plan.cols[c] * sc, plan.cols[c + 1] * sc
            y0, y1 = max(0, cy0 - plan.halo), min(hh, cy1 + plan.halo)
            x0, x1 = max(0, cx0 - plan.halo), min(ww, cx1 + plan.halo)
            rt = res.crop(y0, y1, x0, x1, self.device) if res is not None else None
            state.append([cur.crop(y0, y1, x0, x1, self.device), rt,
                          (cy0 - y0, cy1 - y0, cx0 - x0, cx1 - x0), (plan.rows[r] * total, plan.cols[c] * total)])
            for plane in (cur, res):
                if plane is not None:
                    plane.release()
        moments: Moments | None = None
        for i in range(k, len(ops)):
            op = ops[i]
            if op.norm is not None and i not in table:
                table[i] = group_norm_affine(op.norm, moments, self.device, self.dtype)
            affine = table.get(i) if op.norm is not None else None
            # the next op's norm reads this op's output: pool its cores if that norm has no statistics yet
            nxt = i + 1
            moments = Moments() if nxt < len(ops) and ops[nxt].norm is not None and nxt not in table else None
            for s in state:
                x, r, (a0, a1, b0, b1) = s[0], s[1], s[2]
                if op.save:
                    s[1] = r = x
                # normalise in place unless the un-normalised input is still needed (residual, attention)
                t = x.clone() if (op.save or op.kind == "attention") else x
                apply_affine_(t, affine)
                if op.kind == "attention":  # tile-local: attention over the window's tokens
                    o = from_tokens(attend(op.attn, to_tokens(t), to_tokens(t)), t.shape[2], t.shape[3])
                    o = (o + x) / op.attn.rescale_output_factor
                elif op.skip:
                    o = op.fn(t, r)
                    s[1] = None
                else:
                    o = op.fn(t)
                u = op.up
                s[0], s[2] = o, (a0 * u, a1 * u, b0 * u, b1 * u)
                if moments is not None:
                    moments.add(o[:, :, a0 * u : a1 * u, b0 * u : b1 * u])
                del t, o, x
        for s in state:
            a0, a1, b0, b1 = s[2]
            oy, ox = s[3]
            out[:, :, oy : oy + a1 - a0, ox : ox + b1 - b0] = s[0][:, :, a0:a1, b0:b1].to(self.store)


class WindowedAttention:
    """A diffusers attention processor for the VAE's mid-block: self-attention within overlapping windows of
    at most `max_tokens` latent pixels (`attention_bounds`), blended with linear ramps over 2 x `overlap`
    pixels, the GroupNorm over the whole image. The same windows as the tiled decode's tile-local attention,
    so the untiled and tiled decodes agree beyond the global-attention limit too."""

    def __init__(self, max_tokens: int, overlap: int) -> None:
        self.max_tokens, self.overlap = max_tokens, overlap

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("windowed attention: B,C,H,W self-attention without a mask only")
        x = attn.group_norm(hidden_states)  # B,C,h,w, whole-image statistics
        b, c, h, w = x.shape
        rows, cols = attention_bounds(h, w, self.max_tokens, self.overlap)
        acc = torch.zeros_like(x)
        wsum = torch.zeros(h, w, dtype=torch.float64)
        for y0, y1, _, _ in window_spans(h, rows, self.overlap):
            for x0, x1, _, _ in window_spans(w, cols, self.overlap):
                t = to_tokens(x[:, :, y0:y1, x0:x1])  # B,n,C
                o = from_tokens(attend(attn, t, t), y1 - y0, x1 - x0)  # B,C,wh,ww
                weight = blend_ramp(y0, y1, h, self.overlap)[:, None] * blend_ramp(x0, x1, w, self.overlap)[None, :]
                wsum[y0:y1, x0:x1] += weight
                acc[:, :, y0:y1, x0:x1] += o * weight.to(o.device, o.dtype)
        out = acc / wsum.to(acc.device, acc.dtype)
        return (out + hidden_states) / attn.rescale_output_factor


@contextlib.contextmanager
def mid_attention_processor(vae: Any, processor: Any) -> Any:
    """Run the decoder's mid-block attention with `processor` (None: leave it alone), restored afterwards."""
    attentions = [a for a in getattr(vae.decoder.mid_block, "attentions", []) if a is not None]
    if processor is None or not attentions:
        yield
        return
    for a in attentions:
        attention_op(a)  # a plain GroupNorm self-attention with a residual, or NotImplementedError
    saved = [a.processor for a in attentions]
    for a in attentions:
        a.set_processor(processor)
    try:
        yield
    finally:
        for a, p in zip(attentions, saved):
            a.set_processor(p)



"""Shared pieces of the server tests: the tiny random model, a gate around the real upscaler, images,
and a real uvicorn server on a loopback port in a thread. Imported by tests/test_server_*.py."""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

TIMEOUT = 60.0  # seconds any single wait in these tests may take before failing


class Gate:
    """The real upscaler, paused after step `pause_at` until `release` is set (to hold a job 'running').

    Only the diffusion method has steps: classical jobs pass straight through."""

    def __init__(self, inner: Any, pause_at: int = 1) -> None:
        self.inner, self.info, self.pause_at = inner, inner.info, pause_at
        self.paused = threading.Event()
        self.release = threading.Event()
        self.steps_seen: list[int] = []
        self.calls = 0

    def __call__(self, image: Any, options: Any, progress: Any = None) -> Any:
        self.calls += 1

        def gated(i: int, n: int) -> None:
            self.steps_seen.append(i)
            progress(i, n)  # the manager's callback: raises JobCancelled when cancelled
            if i == self.pause_at and not self.release.is_set():
                self.paused.set()
                if not self.release.wait(TIMEOUT):
                    raise TimeoutError("the test never released the gate")

        return self.inner(image, options, progress=gated)


def png_bytes(size: tuple[int, int] = (24, 16), color: tuple[int, ...] = (200, 30, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def image_bytes(fmt: str, size: tuple[int, int] = (20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 230)).save(buf, fmt)
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header for width x height 8-bit grey whose pixel data are all zeros: a few hundred
    KB on the wire, `width*height` bytes (400 MB by default) once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = [z.compress(row) for _ in range(height)]
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def png_metadata(data: bytes) -> dict[str, Any]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return json.loads(im.text["sdx4"])


def wait_until(predicate: Any, timeout: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """A real uvicorn serving `app` on 127.0.0.1 in a thread; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "uvicorn did not stop"

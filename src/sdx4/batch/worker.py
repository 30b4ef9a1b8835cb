"""A worker's part of a folder job, shared by the local and the Ray engine: load the model once, then run
items through three stages (a reader thread decodes the next image, the main thread upscales the current
one, a writer thread writes the previous one and hands its record on)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .items import read_item, upscale_item, write_item
from .job import BatchItem, BatchJob

_END = object()


def distinct_prompts(items: list[BatchItem], limit: int = 32) -> list[str]:
    """The prompts (and negative prompts where guidance needs them) the diffusion items use, first
    seen first, at most `limit` (the prompt cache's size): later ones are encoded when they come."""
    prompts: dict[str, None] = {}
    for item in items:
        o = item.options
        if o.method == "sd":
            prompts.update(dict.fromkeys(o.text_prompts))
    return list(prompts)[:limit]


def run_pipeline(
    items: Iterable[BatchItem],
    upscaler: Any,
    input_dir: Path,
    output_dir: Path,
    on_record: Callable[[dict[str, Any]], None],
    prefetch: int = 2,
) -> None:
    """Read -> upscale -> write with the three stages overlapped.

    A reader thread decodes up to `prefetch` images ahead; the calling thread runs the model; a writer
    thread writes outputs and calls `on_record` (in input order) while the next image runs. On an
    interrupt (Ctrl-C) the reader stops, the writer finishes the images already upscaled, and the
    interrupt propagates.
    """
    items = list(items)
    if upscaler is not None:
        # All prompts up front: with the low-memory policy the text encoder is then loaded once.
        upscaler.encode_prompts(distinct_prompts(items))
    read_q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    write_q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for item in items:
                if stop.is_set():
                    break
                loaded = read_item(item, input_dir, output_dir)
                while not stop.is_set():
                    try:
                        read_q.put(loaded, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(e)
        finally:
            _put_end(read_q, stop)

    def writer() -> None:
        try:
            while True:
                done = write_q.get()
                if done is _END:
                    return
                on_record(write_item(done, output_dir))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread below
            errors.append(e)
            stop.set()
            while write_q.get() is not _END:  # drain so the main thread never blocks on put
                pass

    threads = [threading.Thread(target=reader, name="sdx4-reader", daemon=True)]
    threads.append(threading.Thread(target=writer, name="sdx4-writer", daemon=True))
    for t in threads:
        t.start()
    try:
        while not stop.is_set():
            loaded = read_q.get()
            if loaded is _END:
                break
            write_q.put(upscale_item(loaded, upscaler))
    finally:
        stop.set()
        write_q.put(_END)
        threads[1].join()  # the writer finishes what was already upscaled
        while threads[0].is_alive():  # unblock the reader if it waits on a full queue
            try:
                read_q.get_nowait()
            except queue.Empty:
                pass
            threads[0].join(timeout=0.05)
    if errors:
        raise errors[0]


def _put_end(q: queue.Queue[Any], stop: threading.Event) -> None:
    while True:
        try:
            q.put(_END, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass


def load_upscaler(job: BatchJob, prompts: list[str] | None = None) -> Any:
    """The model, once per engine worker (None for the classical methods: no model, no torch).
    `prompts` are encoded before the UNet is loaded (see sdx4.load); default: the job's own."""
    if job.options.method != "sd":
        return None
    from ..api import load

    return load(job.load, prompts=job.options.text_prompts if prompts is None else prompts)



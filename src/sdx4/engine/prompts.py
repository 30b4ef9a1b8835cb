"""Prompts -> the UNet's encoder_hidden_states: the CLIP text encoder, the guidance batch order, and a cache
so that a prompt is encoded once (with the low-memory policy, the text encoder is dropped in between)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..model.loading import Components
from ..options import UpscaleOptions, check_text
from . import budget, prompt_store

log = logging.getLogger("sdx4")

@torch.no_grad()
def encode_prompt(components: Components, prompt: str) -> torch.Tensor:
    """Prompt -> CLIP text hidden states, 1 x 77 x D (last hidden state, as diffusers uses it)."""
    tok, enc = components.tokenizer, components.text_encoder
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    mask = None
    if getattr(enc.config, "use_attention_mask", False):
        mask = ids.attention_mask.to(enc.device)
    return enc(ids.input_ids.to(enc.device), attention_mask=mask)[0]  # 1,77,D


#: prompts -> their embeddings (1,77,D each), in order. The Upscaler passes a PromptCache.
EncodeFn = Callable[[list[str]], list[torch.Tensor]]


def prompt_embeddings(components: Components, options: UpscaleOptions, encode: EncodeFn | None = None) -> torch.Tensor:
    """The UNet's encoder_hidden_states: [negative x n, positive x n] with guidance, [positive x n] without.

    `encode` defaults to running the text encoder on each prompt; both prompts go in one call, so a
    cache that has to load the text encoder loads it once.
    """
    encode = encode or (lambda texts: [encode_prompt(components, text) for text in texts])
    n = options.num_images
    if not options.do_guidance:
        (cond,) = encode([options.prompt])
        return cond.repeat(n, 1, 1)  # n,77,D
    uncond, cond = encode([options.negative_prompt, options.prompt])
    return torch.cat([uncond.repeat(n, 1, 1), cond.repeat(n, 1, 1)])  # 2n,77,D  (CFG batch order: negative first)


def check_prompts(prompts: Any) -> list[str]:
    """A list of prompt strings, or a TypeError that says what to pass (one string is not a list of them)."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, not one string: pass [{prompts!r}]")
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings; got {prompts!r}")
    for p in prompts:
        check_text("prompts", p)
    return prompts


class PromptCache:
    """Prompt -> embeddings, least recently used first out; the text encoder runs once per prompt.

    With `low_memory`, the text encoder is dropped (and its memory given back to the OS) as soon as the
    prompts of a call are encoded; a later prompt that is not cached loads it again from the model folder
    (~1-3 s on a CPU). `encoder_runs` counts encoded prompts, `encoder_loads` the reloads.
    """

    def __init__(self, components: Components, max_entries: int = 32, low_memory: bool = False) -> None:
        import threading
        from collections import OrderedDict

        self.components, self.max_entries, self.low_memory = components, max_entries, low_memory
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoder_runs = 0
        self.encoder_loads = 0  # loads of the text encoder after the model's load
        self.kept_reads = 0  # prompts read from the cache folder (prompt_store.py) instead of encoded
        #: Seconds of the last text-encoder load done here and of the encoder runs (None: none done here).
        self.encoder_load_seconds: float | None = None
        self.encode_seconds: list[float] = []
        #: The text encoder's timings recorded with the kept embeddings read here ({} when none was read):
        #: what a new prompt costs when this process has not loaded the encoder (the estimates use them).
        self.kept_timing: dict[str, float] = {}

    def __call__(self, prompts: list[str], keep: bool = False) -> list[torch.Tensor]:
        """The embeddings of `prompts`, in order. `keep`: read the ones not in memory from the cache folder
        and keep the newly encoded ones there (prompt_store.py; `sdx4.load` does it for the prompts it is given;
        no other prompt is ever written to disk)."""
        import time

        prompts = check_prompts(prompts)
        with self._lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._entries]
            c = self.components
            if missing and keep:
                for prompt in list(missing):
                    kept = prompt_store.read(c, prompt)
                    if kept is not None:
                        self._entries[prompt], timing = kept
                        self.kept_timing = self.kept_timing or timing
                        self.kept_reads += 1
                        missing.remove(prompt)
            if missing:
                if c.text_encoder is None:
                    if c.text_encoder_loaded:
                        log.info("loading the text encoder again for %d new prompt(s) (low-memory policy)", len(missing))
                        self.encoder_loads += 1
                    t0 = time.perf_counter()
                    c.text_encoder = c.load_text_encoder()
                    self.encoder_load_seconds = time.perf_counter() - t0
                for prompt in missing:
                    t0 = time.perf_counter()
                    self._entries[prompt] = encode_prompt(c, prompt).to(c.placement.unet_dtype)  # 1,77,D
                    self.encode_seconds.append(time.perf_counter() - t0)
                    self.encoder_runs += 1
                    if keep:
                        timing = {"encoder_load_s": self.encoder_load_seconds, "encode_s": self.encode_seconds[-1]}
                        prompt_store.write(c, prompt, self._entries[prompt], timing)
                if self.low_memory:
                    self._drop_encoder()
            out = []
            for prompt in prompts:
                self._entries.move_to_end(prompt)
                out.append(self._entries[prompt])
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return out

    def missing(self, prompts: list[str]) -> list[str]:
        """The prompts of `prompts` not cached now (each once): what a call would have to encode."""
        with self._lock:
            return [p for p in dict.fromkeys(prompts) if p not in self._entries]

    def drop_encoder(self) -> None:
        """Drop the text encoder now (if loaded) and give its memory back; a new prompt loads it again."""
        with self._lock:
            self._drop_encoder()

    def _drop_encoder(self) -> None:
        if self.components.text_encoder is not None:
            self.components.text_encoder = None
            budget.release_memory()


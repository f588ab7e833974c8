"""Timing one configuration: a split pass (each part of each batch between CUDA events) and a set pass (the set as a
run does it, the next batch's ViT on a side stream); CUDA-graph replays counted."""
from __future__ import annotations

import time

import torch

from workload import Batch, sync  # first: puts the project root on sys.path

from configs.decoding import DecodingSettings  # noqa: E402
from decoding import Decoder  # noqa: E402
from lynx.run import with_media_ahead  # noqa: E402
from models.lynx import Lynx  # noqa: E402


class Clock:
    """Marks that cost no host sync on CUDA (events), read after a synchronize."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a


class Runner:
    """One configuration: the original's (transformers' generate) or a fast path (Lynx's own decoder)."""

    def __init__(self, model: Lynx, decoder: Decoder, device: str):
        self.model, self.decoder, self.device = model, decoder, device
        self.clock = Clock(device)
        self.marks = {}
        self.hooks = []

    def answer(self, batch: Batch, settings: DecodingSettings, visual=None) -> torch.Tensor:
        if visual is None:
            visual = self.model.encode_media(batch.pixel_values.to(self.device, non_blocking=True))
        embeds, mask = self.model.fuse(visual, batch.input_ids, batch.attention_mask)
        return self.decoder.generate(embeds, mask, settings)

    # marks taken by hooks: the resampler's start and end, the first LM head call (end of the prefill)
    def _mark(self, name):
        def hook(*_):
            if name not in self.marks:
                self.marks[name] = self.clock.mark()
        return hook

    def split_pass(self, batches, settings: DecodingSettings) -> dict:
        """Every batch part by part: seconds of ViT, resampler, prefill, decode, and the answers."""
        model = self.model
        self.hooks = [model.bridge.register_forward_pre_hook(self._mark("vit_end")),
                      model.bridge.register_forward_hook(self._mark("bridge_end")),
                      model.LLM.lm_head.register_forward_hook(self._mark("prefill_end"))]
        parts = dict(vit=0.0, resampler=0.0, prefill=0.0, decode=0.0)
        answers = []
        sync(self.device)
        wall = time.perf_counter()
        try:
            for batch in batches:
                self.marks = {}
                start = self.clock.mark()
                ids = self.answer(batch, settings)
                end = self.clock.mark()
                sync(self.device)
                m, sec = self.marks, self.clock.seconds
                parts["vit"] += sec(start, m["vit_end"])
                parts["resampler"] += sec(m["vit_end"], m["bridge_end"])
                parts["prefill"] += sec(m["bridge_end"], m["prefill_end"])
                parts["decode"] += sec(m["prefill_end"], end)
                answers.extend(ids.tolist())
        finally:
            for h in self.hooks:
                h.remove()
        return dict(parts=parts, wall=time.perf_counter() - wall, answers=answers)

    def set_pass(self, batches, settings: DecodingSettings) -> float:
        """The whole set as a run does it; on CUDA the next batch's ViT and resampler run on a side stream."""
        sync(self.device)
        start = time.perf_counter()
        for batch, visual in with_media_ahead(batches, self.model):  # generate.py's loop
            self.answer(batch, settings, visual=visual).tolist()
        sync(self.device)
        return time.perf_counter() - start


class Replays:
    """CUDA-graph replays, counted by torch's global hook: a fast row with none decoded step by step."""

    def __init__(self, cuda: bool):
        self.count = 0
        register = getattr(torch.cuda.graphs, "register_graph_replay_start_hook", None)
        self.handle = register(self._seen) if cuda and register else None

    def _seen(self, graph) -> None:
        self.count += 1

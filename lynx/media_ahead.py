"""The next batch's visual prefix, computed while the LLM decodes this batch."""
from __future__ import annotations

import torch

from decoding.cuda import on_device


class MediaAhead:
    """Lynx's ViT and resampler for the next batch on a side CUDA stream, while the LLM decodes this batch.

        ahead = MediaAhead(model)
        ahead.submit(batches[0].pixel_values)
        for j, batch in enumerate(batches):
            visual = ahead.take()
            if j + 1 < len(batches):
                ahead.submit(batches[j + 1].pixel_values)
            ...decode with visual...

    Every stream, wait and event names the model's device: on cuda:1, the current stream of the current device
    (GPU 0 unless selected) is not the one the LLM runs on, and waiting on it would let the LLM read the prefix
    while the ViT still writes it. Off CUDA, `submit` only keeps the pixels and `take` encodes them.
    """

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self.pending = None

    def submit(self, pixel_values: torch.Tensor) -> None:
        if self.stream is None:
            self.pending = pixel_values
            return
        with on_device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # what came before, e.g. a weight update
            with torch.cuda.stream(self.stream):
                visual = self.model.encode_media(pixel_values.to(self.device, non_blocking=True))
                done = torch.cuda.Event()
                done.record(self.stream)
        self.pending = (visual, done)

    def take(self) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if self.stream is None:
            return self.model.encode_media(pending)
        visual, done = pending
        with on_device(self.device):
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            visual.record_stream(current)  # made on the side stream, used and freed on this one
        return visual

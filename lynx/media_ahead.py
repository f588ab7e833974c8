"""The next batch's visual prefix, computed while the LLM decodes this batch."""
from __future__ import annotations

import torch


class MediaAhead:
    """Lynx's ViT and resampler for the next batch on a side CUDA stream, while the LLM decodes this batch.

        ahead = MediaAhead(model)
        ahead.submit(batches[0].pixel_values)
        for j, batch in enumerate(batches):
            visual = ahead.take()
            if j + 1 < len(batches):
                ahead.submit(batches[j + 1].pixel_values)
            ...decode with visual...

    Off CUDA, `submit` only keeps the pixels and `take` encodes them.
    """

    def __init__(self, model):
        self.model = model
        self.stream = torch.cuda.Stream(device=model.device) if model.device.type == "cuda" else None
        self.pending = None

    def submit(self, pixel_values: torch.Tensor) -> None:
        if self.stream is None:
            self.pending = pixel_values
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            visual = self.model.encode_media(pixel_values.to(self.model.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending = (visual, done)

    def take(self) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if self.stream is None:
            return self.model.encode_media(pending)
        visual, done = pending
        torch.cuda.current_stream().wait_event(done)
        visual.record_stream(torch.cuda.current_stream())  # made on the side stream, used and freed on this one
        return visual

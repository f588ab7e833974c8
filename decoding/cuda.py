"""The CUDA calls of the fast path, each naming its device.

torch's stream, event, graph and generator calls default to the *current* device, which is GPU 0 unless a thread
selected another, and each thread (a server's model thread, a loading thread) starts on GPU 0. A model on cuda:1 whose
streams, waits or graph capture landed on GPU 0 would capture nothing, or let one stream read what another still
writes. So every call here names the device, and `on_device` makes it current for a block of work.
"""
from __future__ import annotations

import contextlib

import torch


def on_device(device) -> contextlib.AbstractContextManager:
    """`device` as the current CUDA device for a block (calls that default to it then land there); nothing
    elsewhere."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class CudaCalls:
    """What CUDA-graph capture and replay need from one device (the CPU tests pass a fake with the same methods).

    `record(graph, fn)` runs fn while `graph` captures (the CUDA runtime records the kernels fn launches); a fake
    keeps fn to run on replay.
    """

    def __init__(self, device):
        device = torch.device(device)
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.index = self.device.index

    def stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(device=self.device)

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def use(self, stream) -> contextlib.AbstractContextManager:
        """`stream` current for a block; the previous one is current again however the block ends."""
        return torch.cuda.stream(stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    def pool(self):
        return torch.cuda.graph_pool_handle()

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device)

    def holds(self, generator: torch.Generator) -> bool:
        """Whether `generator` draws on this device (the graphs' generator can then take its state)."""
        device = generator.device
        index = device.index if device.index is not None else torch.cuda.current_device()
        return device.type == "cuda" and index == self.index

    def default_generator(self) -> torch.Generator:
        """The generator sampling draws from when no generator is given (torch.manual_seed seeds it)."""
        return torch.cuda.default_generators[self.index]

    def record(self, graph, fn) -> None:
        fn()

    def abandon(self, graph, pool) -> None:
        """After a capture that did not end cleanly: the graph lets go of what it holds (torch releases its hold on
        the memory pool where it knows how; this never releases it a second time, which could free memory the
        workspace's other graphs use), then the allocator stops sending allocations to the pool if it still does.
        Some torch versions leave it so after a failed capture_end, and an allocator that believes a capture is
        under way defers the frees of blocks used on other streams for good: memory would grow every batch."""
        graph.reset()
        try:
            torch._C._cuda_endAllocateToPool(self.index, pool)
        except RuntimeError:  # "not currently recording": torch ended it already
            pass

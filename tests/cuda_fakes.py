"""Stand-ins for CUDA objects, so that the CUDA path's mechanisms (capture, its failures, replay, draws, devices) run
in the CPU tests: the real code calls the same methods, only what a method does differs."""
from __future__ import annotations

import contextlib

import torch


class FakeStream:
    def __init__(self, name: str, device="cuda:1"):
        self.name, self.device = name, torch.device(device)
        self.waited: list = []

    def wait_stream(self, other) -> None:
        self.waited.append(other)

    def wait_event(self, event) -> None:
        self.waited.append(event)

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeGraph:
    """A CUDA graph stand-in: `record` keeps the function the capture ran, `replay` runs it again."""

    def __init__(self, cuda: "FakeCuda"):
        self.cuda, self.fn, self.ended, self.generators = cuda, None, False, []

    def register_generator_state(self, generator) -> None:
        self.generators.append(generator)

    def capture_begin(self, pool=None, capture_error_mode="global") -> None:
        assert self.cuda.current.name != "default", "CUDA graphs are captured on a side stream"
        if self.cuda.fail_capture_begin:
            self.cuda.fail_capture_begin -= 1
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        self.cuda.capturing = True

    def capture_end(self) -> None:
        self.cuda.capturing = False
        if self.cuda.fail_capture_end:
            self.cuda.fail_capture_end -= 1
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.ended = True

    def pool(self):
        if not self.ended:
            raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
        return ("pool",)

    def reset(self) -> None:
        self.cuda.resets += 1

    def replay(self) -> None:
        self.cuda.replays += 1
        self.fn()


class FakeCuda:
    """decoding.cuda.CudaCalls on the CPU. A capture runs the step once (the decoder resets the search state after
    capturing, as a real capture changes nothing); a replay runs it again. Counts what happened."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.current = FakeStream("default")
        self.capturing = False
        self.fail_capture_begin = 0  # capture_begin failures to come
        self.fail_capture_end = 0  # capture_end failures to come (a capture invalidated at its end)
        self.graphs: list[FakeGraph] = []
        self.replays = 0
        self.resets = 0
        self.abandoned = 0

    def stream(self) -> FakeStream:
        return FakeStream("side")

    def current_stream(self) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def use(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def synchronize(self) -> None:
        pass

    def graph(self) -> FakeGraph:
        self.graphs.append(FakeGraph(self))
        return self.graphs[-1]

    def pool(self):
        return ("pool",)

    def generator(self) -> torch.Generator:
        return torch.Generator()

    def holds(self, generator: torch.Generator) -> bool:
        return generator.device.type == "cpu"

    def default_generator(self) -> torch.Generator:
        return torch.default_generator

    def record(self, graph: FakeGraph, fn) -> None:
        graph.fn = fn
        fn()

    def abandon(self, graph, pool) -> None:
        self.abandoned += 1

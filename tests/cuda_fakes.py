"""Stand-ins for CUDA objects, so that the CUDA path's mechanisms (capture, its failures, replay, draws, devices) run
in the CPU tests: the real code calls the same methods, only what a method does differs. A replay can be checked
against eager decoding (EagerSteps): the step it runs is the decoder's own, so comparing answers with the same
decoder run step by step would not see a mistake in the step itself."""
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
        if self.cuda.check is not None:
            self.cuda.check(self.fn)
        else:
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
        self.check = None  # check(run): runs a replayed step and checks what it did (EagerSteps)

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


class EagerSteps:
    """Checks every replayed decoding step of `decoder` against transformers' forward of its LLM: the logits the
    step left for each beam are those of the prompt followed by that beam's tokens so far, computed from scratch
    (no cache, no slots; the attention mask and the positions of the original's generate), so a step that writes a
    key or value to the wrong slot, or attends the wrong slots, fails at the replay. Install as `FakeCuda.check`."""

    def __init__(self, decoder, rtol: float = 1e-4, atol: float = 1e-4):
        self.decoder, self.rtol, self.atol = decoder, rtol, atol
        self.prompt = None
        self.checked = 0
        prefill = decoder._prefill

        def remember_prompt(ws, embeds, mask):  # the padded batch the cache is filled from
            self.prompt = embeds, mask
            prefill(ws, embeds, mask)

        decoder._prefill = remember_prompt

    def __call__(self, run) -> None:
        ws = self.decoder.workspace
        before = int(ws.step)
        run()
        step = int(ws.step)
        if step == before:  # the final token choice: no forward
            return
        embeds, mask = self.prompt
        llm = self.decoder.llm
        b, k = ws.seqs.shape[:2]
        tokens = ws.seqs[:, :, :step]  # each beam's tokens, the one just fed last
        inputs = torch.cat([embeds[:, None].expand(b, k, *embeds.shape[1:]), llm.get_input_embeddings()(tokens)], 2)
        attended = torch.cat([mask[:, None].expand(b, k, -1), torch.ones_like(tokens, dtype=mask.dtype)], -1)
        attended = attended.flatten(0, 1)
        positions = (attended.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = llm(inputs_embeds=inputs.flatten(0, 1), attention_mask=attended, position_ids=positions)
        torch.testing.assert_close(ws.logits, out.logits[:, -1].float().view(b, k, -1), rtol=self.rtol,
                                   atol=self.atol, msg=lambda m: f"replayed step {step} is not eager decoding: {m}")
        self.checked += 1

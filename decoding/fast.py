"""Lynx's own decoder: each prompt is prefilled once, the KV cache has a fixed size, and a decoding step (token choice
+ one forward) runs without a host sync, so on CUDA it is replayed as a CUDA graph.

The search follows transformers 4.28.1, the original's `generate`, for every decoding option of a Lynx config
(decoding/search.py). On the CPU in float32 it gives the original's ids, sampled ones included when seeded as the
original was (tests/test_decoding_rules.py, tests/test_decoding_fixture.py).
"""
from __future__ import annotations

import logging
import math

import torch

from configs.decoding import DecodingSettings
from decoding.cuda import CudaCalls, is_out_of_memory, on_device
from decoding.draws import lending
from decoding.graphs import CaptureFailed, capture_step_graphs
from decoding.llama import LlamaRunner
from decoding.search import Search, answers, finalize, resolve, selector, start
from decoding.workspace import Workspace
from models.lynx import positions_from_mask

log = logging.getLogger("lynx")


class FastDecoder:
    """`generate` for Lynx's LLM on `inputs_embeds` with a fixed-size cache and graph-replayed steps.

    cuda_graphs (default: on CUDA) captures a step as a CUDA graph per batch shape and search settings; compile
    (default: off) additionally compiles the per-layer code with torch.compile (a string: its backend). prompt_len
    pads every prompt to that many slots, inserting pads after the first prefix_len slots (Lynx: between the visual
    prefix and the text, where they change no position and no attended token), and batch_size pads every batch to
    that many rows, so one graph serves a whole test set. check_every: steps between checks of whether every row is
    done (one host sync each), where a caller's `watch` is called too (see `generate`). cuda: the CUDA calls of
    graph capture (default: those of the model's device; the CPU tests pass a fake that records and replays the
    steps).
    """

    def __init__(self, llm, tokenizer, cuda_graphs: bool | None = None, compile: bool | str = False,
                 prompt_len: int | None = None, batch_size: int | None = None, prefix_len: int = 0,
                 check_every: int = 8, cuda: CudaCalls | None = None):
        self.llm = llm
        self.pad_id, self.eos_id, self.bos_id = tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id
        self.device = llm.lm_head.weight.device
        self.dtype = llm.lm_head.weight.dtype
        self.cuda = cuda if cuda is not None else CudaCalls(self.device) if self.device.type == "cuda" else None
        self.cuda_graphs = self.cuda is not None and cuda_graphs is not False
        self.graph_rng = None  # what captured steps draw from (decoding.graphs), made at the first capture
        self.max_rows: dict[tuple[int, int], int] = {}  # (beams, max_new_tokens): rows that fit after running out
        self.run = LlamaRunner(llm, compile=compile)
        self.prompt_len = prompt_len
        self.batch_size = batch_size
        self.prefix_len = prefix_len
        self.check_every = max(1, check_every)
        self.searches: dict[DecodingSettings, Search] = {}
        self.workspace: Workspace | None = None

    def search_for(self, settings: DecodingSettings) -> Search:
        """The search of these settings, resolved once."""
        if settings not in self.searches:
            self.searches[settings] = resolve(settings, self.pad_id, self.eos_id, self.bos_id)
        return self.searches[settings]

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, settings: DecodingSettings,
                 generator: torch.Generator | None = None, rows: int | None = None, watch=None) -> torch.Tensor:
        """Generated ids (B, T) without the prompt, as `LLM.generate(inputs_embeds=..., attention_mask=...)` returns
        them: after EOS, pad (greedy, sampling) or EOS then pad (beams); T = the longest answer. `generator`: the
        sampling draws (None: the device's default generator). `rows`: pad the batch to that many rows instead of
        batch_size (a caller retrying with fewer rows after running out of memory). `watch`: called at every check
        (decoding.Decoder); when it returns True the search stops there and the ids so far are the answer."""
        search = self.search_for(settings)
        rows = self._rows(inputs_embeds.shape[0], rows, search)
        with on_device(self.device):  # what names no device lands on this one (also on a server's model thread)
            try:
                return self.decode(inputs_embeds, attention_mask, search, generator, rows, watch)
            except RuntimeError as err:  # torch.OutOfMemoryError included
                if is_out_of_memory(err):
                    self._out_of_memory(rows, search)
                raise

    @torch.inference_mode()
    def decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, s: Search,
               generator: torch.Generator | None = None, rows: int | None = None, watch=None) -> torch.Tensor:
        """`generate` with the search given directly (`rows`: as `generate` settles them when not given)."""
        real_rows = inputs_embeds.shape[0]
        rows = self._rows(real_rows, rows, s) if rows is None else rows
        embeds, mask = self._pad(inputs_embeds.to(self.device, self.dtype), attention_mask.to(self.device), rows)
        ws = self._workspace(embeds.shape[0], embeds.shape[1], s.num_beams, s.max_new_tokens)
        self._prefill(ws, embeds, mask)
        graphs = self._graphs(ws, s, generator)  # captured at the first batch of a shape; None: step by step
        start(ws, s)
        stop = None if watch is None else lambda n: watch(ws.seqs[:real_rows, 0, :n] if s.num_beams == 1 else None)
        if graphs is None:
            self._search(ws, s, generator, stop=stop)
        else:  # the graphs draw from graph_rng, lent the state of the batch's generator (or the device's default)
            with lending(generator if generator is not None else self.cuda.default_generator(), self.graph_rng):
                self._search(ws, s, None, graphs, stop)
        if s.num_beams > 1:
            finalize(ws, s)
        return answers(ws, s, real_rows)

    def _search(self, ws: Workspace, s: Search, generator, graphs: dict | None = None, stop=None) -> None:
        """Token after token until every row is done or max_new_tokens are chosen: eager steps, or replayed graphs.
        Whether every row is done is read every check_every steps (a host sync); steps after that change nothing.
        There, once rows are still running, `stop(tokens chosen)` may end the search (the caller's watch)."""
        select = selector(s)
        for step in range(s.max_new_tokens - 1):
            if graphs is not None:
                graphs[ws.keys_at(step)].replay()
            else:
                self._step(ws, s, ws.keys_at(step), generator)
            if (step + 1) % self.check_every == 0 and (bool(ws.done) or stop is not None and stop(step + 1)):
                return
        if graphs is not None:
            graphs["last"].replay()
        else:
            select(ws, s, generator)

    # -- internals

    def _pad(self, embeds: torch.Tensor, mask: torch.Tensor, rows: int):
        """Pad to the fixed prompt length (pads inserted after prefix_len slots) and to `rows` rows (copies of row
        0, dropped later)."""
        b, length, dim = embeds.shape
        target = max(self.prompt_len or length, length)
        if target > length:
            prefix, grow = self.prefix_len, target - length
            embeds = torch.cat([embeds[:, :prefix], embeds.new_zeros(b, grow, dim), embeds[:, prefix:]], dim=1)
            mask = torch.cat([mask[:, :prefix], mask.new_zeros(b, grow), mask[:, prefix:]], dim=1)
        if rows > b:
            embeds = torch.cat([embeds, embeds[:1].expand(rows - b, -1, -1)])
            mask = torch.cat([mask, mask[:1].expand(rows - b, -1)])
        return embeds, mask

    def _workspace(self, batch: int, prompt_len: int, beams: int, max_new: int) -> Workspace:
        """The buffers of this shape: the current ones, or new ones once the old ones are freed."""
        shape = (batch, prompt_len, beams, max_new)
        if self.workspace is None or self.workspace.shape != shape:
            self.workspace = None  # free the old cache and graphs first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.workspace = Workspace(self.run.dims, batch, prompt_len, beams, max_new, self.device, self.dtype)
        return self.workspace

    def _prefill(self, ws: Workspace, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """The prompt once per row: its keys and values into slots [0, prompt_len), the first logits."""
        length = embeds.shape[1]
        attended = mask.bool()
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & attended[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool, device=self.device) & ~allowed.any(-1, keepdim=True)  # no NaN
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, -math.inf)
        slots = torch.arange(length, device=self.device)
        logits = self.run(embeds, positions_from_mask(mask), ws.k, ws.v, slots, additive[:, None], prefill=True)
        ws.first_logits.copy_(logits[:, 0])
        ws.prompt_mask.copy_(attended)
        ws.n_real.copy_(mask.long().sum(-1))

    def _step(self, ws: Workspace, s: Search, n_keys: int, generator=None) -> None:
        """Choose token `step` of every beam, then run the model on it (attending over the first n_keys slots): the
        logits for the next choice."""
        selector(s)(ws, s, generator)
        b, k, t = ws.seqs.shape
        i = ws.step
        at = i.view(1, 1, 1).expand(b, k, 1)
        tokens = ws.seqs.gather(2, at)[..., 0]  # (b, k)
        # beam k now continues beam parent[k]: it sees parent's slots for earlier tokens and its own slot for this one
        history = ws.history.gather(1, ws.parent[..., None].expand(b, k, t))
        own = torch.arange(k, device=self.device)
        history.scatter_(2, at, own.view(1, k, 1).expand(b, k, 1))
        ws.history.copy_(history)
        seen = torch.arange(t, device=self.device) <= i
        generated = (history[:, :, None, :] == own.view(1, 1, k, 1)) & seen  # (b, query beam, slot beam, step)
        generated = generated.transpose(2, 3).reshape(b, k, t * k)  # slot order: step-major
        spare = ws.slots - ws.prompt_len - t * k
        allowed = torch.cat([ws.prompt_mask[:, None, :].expand(b, k, ws.prompt_len), generated,
                             generated.new_zeros(b, k, spare)], dim=-1)[..., :n_keys]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, -math.inf)
        slots = ws.prompt_len + i * k + own
        positions = (ws.n_real[:, None] + i).expand(b, k)
        ws.logits.copy_(self.run(self.run.embed(tokens), positions, ws.k, ws.v, slots, mask[:, None]))
        ws.step.add_(1)

    # -- CUDA graphs, memory and devices

    def _rows(self, real: int, rows: int | None, s: Search) -> int:
        """The rows to decode at: the caller's `rows` or batch_size, at most what fit after running out of memory
        with these settings; a batch with more real rows than that is refused at once (the caller retries in
        halves) rather than failing again after a new, larger cache and capture."""
        wanted = max(rows if rows is not None else (self.batch_size or real), real)
        fits = self.max_rows.get((s.num_beams, s.max_new_tokens))
        if fits is None:
            return wanted
        if real > fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {real} rows of {s.num_beams} beams did not fit on "
                                         f"{self.device} before; at most {fits} at a time")
        return min(wanted, fits)

    def _out_of_memory(self, rows: int, s: Search) -> None:
        """Running out of memory with `rows` rows: later batches of these settings get at most the larger half of
        that (what the retry's halves ask for), and the cache and graphs go (the retry builds smaller ones)."""
        key = (s.num_beams, s.max_new_tokens)
        fits = (rows + 1) // 2
        if fits < self.max_rows.get(key, rows):
            self.max_rows[key] = fits
            log.warning("out of GPU memory decoding %d rows x %d beams on %s: at most %d rows at a time from now on",
                        rows, s.num_beams, self.device, fits)
        self.workspace = None

    def _graphs(self, ws: Workspace, s: Search, generator: torch.Generator | None) -> dict | None:
        """The step graphs of these settings on this workspace, captured at their first use; None: decode step by
        step (graphs off, a generator on another device, or a capture that failed)."""
        if not self.cuda_graphs:
            return None
        if self.graph_rng is None:
            self.graph_rng = self.cuda.generator()
        if generator is not None and not self.cuda.holds(generator):
            return None
        if s not in ws.graphs:
            self._capture(ws, s)
        return ws.graphs[s]

    def _capture(self, ws: Workspace, s: Search) -> None:
        """Capture the step graphs of these settings. Running out of memory is raised (the caller retries with
        fewer rows); a capture that fails otherwise is reported and this shape decoded step by step, while other
        shapes keep their graphs. A compile failure costs nothing here: the runner runs that shape uncompiled."""
        rng = self.graph_rng
        try:
            ws.graphs[s] = capture_step_graphs(ws, s, step=lambda n_keys: self._step(ws, s, n_keys, rng),
                                               last=lambda: selector(s)(ws, s, rng), cuda=self.cuda, rng=rng)
        except CaptureFailed as err:
            log.warning("%s; decoding this shape step by step (the same tokens, slower)", err)
            ws.graphs[s] = None

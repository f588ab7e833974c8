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
from decoding.draws import drawing_from
from decoding.graphs import capture_step_graphs
from decoding.llama import LlamaRunner
from decoding.search import Search, finalize, resolve, selector
from decoding.workspace import Workspace
from models.lynx import positions_from_mask

log = logging.getLogger("lynx")


class FastDecoder:
    """`generate` for Lynx's LLM on `inputs_embeds` with a fixed-size cache and graph-replayed steps.

    cuda_graphs (default: on CUDA) captures a step as a CUDA graph per batch shape and search settings; compile
    (default: off) additionally compiles the per-layer code with torch.compile. prompt_len pads every prompt to that
    many slots, inserting pads after the first prefix_len slots (Lynx: between the visual prefix and the text, where
    they change no position and no attended token), and batch_size pads every batch to that many rows, so one graph
    serves a whole test set. check_every: steps between checks of whether every row is done (one host sync each).
    """

    def __init__(self, llm, tokenizer, cuda_graphs: bool | None = None, compile: bool = False,
                 prompt_len: int | None = None, batch_size: int | None = None, prefix_len: int = 0,
                 check_every: int = 8):
        self.llm = llm
        self.pad_id, self.eos_id, self.bos_id = tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id
        self.device = llm.lm_head.weight.device
        self.dtype = llm.lm_head.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
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
                 generator: torch.Generator | None = None, rows: int | None = None) -> torch.Tensor:
        """Generated ids (B, T) without the prompt, as `LLM.generate(inputs_embeds=..., attention_mask=...)` returns
        them: after EOS, pad (greedy, sampling) or EOS then pad (beams); T = the longest answer. `generator`: the
        sampling draws (None: the device's default generator). `rows`: pad the batch to that many rows instead of
        batch_size (a caller retrying with fewer rows after running out of memory)."""
        return self.decode(inputs_embeds, attention_mask, self.search_for(settings), generator, rows)

    @torch.inference_mode()
    def decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, s: Search,
               generator: torch.Generator | None = None, rows: int | None = None) -> torch.Tensor:
        """`generate` with the search given directly."""
        real_rows = inputs_embeds.shape[0]
        embeds, mask = self._pad(inputs_embeds.to(self.device, self.dtype), attention_mask.to(self.device),
                                 rows if rows is not None else self.batch_size)
        ws = self._workspace(embeds.shape[0], embeds.shape[1], s.num_beams, s.max_new_tokens)
        self._prefill(ws, embeds, mask)
        if self.cuda_graphs and s not in ws.graphs:
            self._capture(ws, s)
        ws.reset(s)
        graphs = ws.graphs.get(s) if self.cuda_graphs else None
        if graphs is None:
            self._search(ws, s, generator)
        else:  # the graphs recorded draws from the default generator: it draws the generator's stream meanwhile
            with drawing_from(generator, self.device):
                self._search(ws, s, None, graphs)
        if s.num_beams > 1:
            finalize(ws, s)
        return ws.answers(s, real_rows)

    def _search(self, ws: Workspace, s: Search, generator, graphs: dict | None = None) -> None:
        """Token after token until every row is done or max_new_tokens are chosen: eager steps, or replayed graphs.
        Whether every row is done is read every check_every steps (a host sync); steps after that change nothing."""
        select = selector(s)
        for step in range(s.max_new_tokens - 1):
            if graphs is not None:
                graphs[ws.keys_at(step)].replay()
            else:
                self._step(ws, s, ws.keys_at(step), generator)
            if (step + 1) % self.check_every == 0 and bool(ws.done):
                return
        if graphs is not None:
            graphs["last"].replay()
        else:
            select(ws, s, generator)

    # -- internals

    def _pad(self, embeds: torch.Tensor, mask: torch.Tensor, rows: int | None):
        """Pad to the fixed prompt length (pads inserted after prefix_len slots) and to `rows` rows (copies of row
        0, dropped later)."""
        b, length, dim = embeds.shape
        target = max(self.prompt_len or length, length)
        if target > length:
            prefix, grow = self.prefix_len, target - length
            embeds = torch.cat([embeds[:, :prefix], embeds.new_zeros(b, grow, dim), embeds[:, prefix:]], dim=1)
            mask = torch.cat([mask[:, :prefix], mask.new_zeros(b, grow), mask[:, prefix:]], dim=1)
        rows = max(rows or b, b)
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

    def _capture(self, ws: Workspace, s: Search) -> None:
        """The step graphs of these settings on this workspace; if compiling or capturing fails, decode step by
        step, uncompiled, from now on: the same tokens, only slower."""
        try:
            ws.graphs[s] = capture_step_graphs(ws, s, step=lambda n_keys: self._step(ws, s, n_keys),
                                               last=lambda: selector(s)(ws, s))
        except Exception as err:
            log.warning("compiling or capturing the decoding step failed (%s: %s); decoding without CUDA graphs",
                        type(err).__name__, (str(err).splitlines() or [""])[0])
            torch.cuda.synchronize()
            self.cuda_graphs = False
            self.run = LlamaRunner(self.llm)

"""CUDA-graph capture of the decoding step: one graph per attention width, and one of the final token choice.

A graph replays the kernels it recorded on the same tensors, so the step must update the workspace in place and
never sync with the host; the workspace's tensors then carry each new batch into the recorded kernels.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from decoding.search import Search
from decoding.workspace import Workspace


def capture_step_graphs(ws: Workspace, s: Search, step: Callable[[int], None],
                        last: Callable[[], None]) -> dict:
    """{slots attended: graph of `step(n_keys)`, "last": graph of `last()`} for these settings, recorded on the
    workspace's tensors. `step(n_keys)`: choose a token, run the model on it attending over n_keys slots;
    `last()`: the final token choice. Raises what compiling or capturing raised."""
    widths = sorted({ws.keys_at(i) for i in range(s.max_new_tokens - 1)})
    ws.reset(s)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, pick kernels, allocate workspaces
        for _ in range(2):
            for n_keys in widths[:s.max_new_tokens - 1]:  # the step counter must stay below max_new_tokens
                step(n_keys)
            ws.reset(s)
        last()
    torch.cuda.current_stream().wait_stream(side)
    ws.reset(s)
    ws.pool = ws.pool or torch.cuda.graph_pool_handle()
    graphs = {}
    for n_keys in widths + ["last"]:
        graphs[n_keys] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[n_keys], pool=ws.pool, capture_error_mode="thread_local"):
            if n_keys == "last":
                last()
            else:
                step(n_keys)
    return graphs

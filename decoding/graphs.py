"""CUDA-graph capture of the decoding step: one graph per attention width, and one of the final token choice.

A graph replays the kernels it recorded on the same tensors, so the step must update the workspace in place and
never sync with the host; the workspace's tensors then carry each new batch into the recorded kernels.

Sampling draws inside a graph come from a generator registered with it (`CUDAGraph.register_generator_state`): the
recorded kernels read that generator's seed and offset when a replay starts, and each replay advances its offset as
the same kernels run eagerly would. The decoder owns one such generator (`graph_rng`); before replaying a batch it
copies the state of the generator the batch asked for (or torch's default CUDA generator) into it, and copies the
advanced state back afterwards, so a batch draws the numbers it would draw step by step, and a seeded generator
passed with every batch keeps the graphs.

Capture cleans up after itself: whatever fails, the previous stream is current again and the allocator leaves
capture mode. Running out of memory is raised as it is (the caller retries with fewer rows); any other failure of
the capture itself is raised as CaptureFailed (the caller decodes that shape step by step).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

from decoding.cuda import CudaCalls, is_out_of_memory
from decoding.search import Search, start
from decoding.workspace import Workspace
from errors import described


class CaptureFailed(RuntimeError):
    """Capturing a step as a CUDA graph failed for a reason other than memory (e.g. invalidated at its end)."""


def capture_step_graphs(ws: Workspace, s: Search, step: Callable[[int], None], last: Callable[[], None],
                        cuda: CudaCalls, rng) -> dict:
    """{slots attended: graph of `step(n_keys)`, "last": graph of `last()`} for these settings, recorded on the
    workspace's tensors; `step` and `last` draw from `rng`, which every graph registers. `step(n_keys)`: choose a
    token, run the model on it attending over n_keys slots; `last()`: the final token choice. The step's
    compilation happens in the warm-up, before any capture."""
    widths = sorted({ws.keys_at(i) for i in range(s.max_new_tokens - 1)})
    start(ws, s)
    side = cuda.stream()
    side.wait_stream(cuda.current_stream())
    with cuda.use(side):  # warm-up: compile, pick kernels, allocate workspaces
        for _ in range(2):
            for n_keys in widths:  # one step per width: the step counter stays below max_new_tokens
                step(n_keys)
            start(ws, s)
        last()
    cuda.current_stream().wait_stream(side)
    start(ws, s)
    ws.pool = ws.pool or cuda.pool()
    graphs = {}
    for n_keys in widths + ["last"]:
        graph = cuda.graph()
        graph.register_generator_state(rng)
        with captured(graph, cuda, side, ws.pool, f"{ws.batch} rows x {s.num_beams} beams"):
            cuda.record(graph, last if n_keys == "last" else lambda n_keys=n_keys: step(n_keys))
        graphs[n_keys] = graph
    return graphs


@contextlib.contextmanager
def captured(graph, cuda: CudaCalls, stream, pool, shape: str):
    """Capture the block's CUDA work on `stream` into `graph`. However it ends, the stream that was current is
    current again and the allocator is out of capture mode; out of memory is raised as such, any other failure as
    CaptureFailed naming the shape."""
    cuda.synchronize()
    failure = None
    with cuda.use(stream):
        try:
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        except BaseException as err:  # noqa: BLE001 - raised below, after the cleanup
            failure = err
        if failure is None:
            try:
                yield
            except BaseException as err:  # noqa: BLE001 - the capture must end first
                failure = err
            try:
                graph.capture_end()  # ends the stream's capture, also after a failure inside the block
            except RuntimeError as err:
                failure = failure or err
        if failure is not None:
            cuda.abandon(graph, pool)
    if failure is not None:
        raise_as_capture_failure(failure, shape)


def raise_as_capture_failure(failure: BaseException, shape: str):
    if is_out_of_memory(failure) or not isinstance(failure, Exception):
        raise failure
    raise CaptureFailed(f"capturing the decoding step of {shape} as a CUDA graph failed "
                        f"({described(failure)})") from failure

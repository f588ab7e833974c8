"""Weight files read whole and a checkpoint copied into a built model: small files in tests. A run reads tensor by
tensor into the model it builds (models/loading.py); these go through the same reader and the same checks."""
from __future__ import annotations

import torch

from models.checkpoint import LoadReport, check_lynx_state, lynx_report, read_lynx_checkpoint
from models.tensor_files import LazyTensor, open_weight_file


def read_state_file(path: str, what: str) -> dict:
    """Every tensor of a weight file, read at once."""
    def read(content):
        if isinstance(content, LazyTensor):
            return content.load()
        return {k: read(v) for k, v in content.items()} if isinstance(content, dict) else content

    return read(open_weight_file(path, what))


def load_lynx_checkpoint(model: torch.nn.Module, path: str) -> LoadReport:
    """Read, check and copy a Lynx checkpoint (trained parts only, or the whole model) into a built model, on top
    of what it holds; each tensor is read once, into the model's device and dtype."""
    own = model.state_dict()
    state = read_lynx_checkpoint(path)
    check_lynx_state(own, state, path)
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.load(own[key].device, own[key].dtype))
    return lynx_report(own, state, path)

"""Prompt text and token ids exactly as the original builds them.

Quirks reproduced on purpose (they change answers):
- `lower_text` lowers the whole formatted prompt, template included ("User:" becomes "user:").
- Only the LAST `max_input_tokens` ids of [BOS] + pieces are kept, so a long prompt loses its BOS and beginning.
"""
from __future__ import annotations

import torch

from errors import RecordError


def format_prompt(template: str, record: dict, lower_text: bool, index=None) -> str:
    """`template.format_map(record).strip()`, lowered when `lower_text`."""
    try:
        text = template.format_map(record).strip()
    except KeyError as err:
        raise RecordError(index, f"the prompt needs field {err} which the record lacks") from None
    except (ValueError, IndexError, AttributeError) as err:
        raise RecordError(index, f"cannot fill the prompt template: {err}") from None
    return text.lower() if lower_text else text


def pad_batch(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id rows to the longest; returns (input_ids, attention_mask) with 0 on pads."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask

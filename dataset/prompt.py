"""Prompt text and token ids exactly as the original builds them.

Quirks reproduced on purpose (they change answers):
- `lower_text` lowers the whole formatted prompt, template included ("User:" becomes "user:").
- Only the LAST `max_input_tokens` ids of [BOS] + pieces are kept, so a long prompt loses its BOS and beginning.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from errors import RecordError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lynx")


def format_prompt(template: str, record: dict, lower_text: bool, index=None) -> str:
    """`template.format_map(record).strip()`, lowered when `lower_text`. A field the template uses must be text or
    a number (formatted as the original does: 42 -> "42"); null, true/false, a list or an object is a RecordError,
    where the original would have asked about "none" or "['a', 'b']"."""
    try:
        text = template.format_map(_PromptFields(record, index)).strip()
    except KeyError as err:
        raise RecordError(index, f"the prompt needs field {err} which the record lacks") from None
    except (ValueError, IndexError, AttributeError) as err:
        raise RecordError(index, f"cannot fill the prompt template: {err}") from None
    return text.lower() if lower_text else text


class _PromptFields:
    """The record as format_map sees it: each field the template names is checked when it is looked up."""

    def __init__(self, record: dict, index):
        self.record, self.index = record, index

    def __getitem__(self, key):
        value = self.record[key]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RecordError(self.index, f"'{key}' must be text or a number, got {_json_kind(value)}")
        return value


def _json_kind(value) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def warn_cut_prompts(records: list, cfg, tokenizer) -> None:
    """One warning, before the model loads, when prompts are longer than `max_input_tokens`: the original keeps only
    their last ids, which the answers follow, but a question cut without a word looks like a bad answer. Names the
    first such record and counts the others; a record whose prompt cannot be made is left to the run to name.
    `tokenizer`: the LLM's (models.tokenizer.LynxTokenizer.of(cfg))."""
    if cfg.max_input_tokens <= 0:
        return
    cut = []
    for record in records:
        try:
            length = len(tokenizer.encode(format_prompt(cfg.prompt, record.fields, cfg.lower_text), 0))
        except RecordError:
            continue
        if length > cfg.max_input_tokens:
            cut.append((record, length))
    if not cut:
        return
    record, length = cut[0]
    name = f"record {record.index!r} ({record.path}:{record.line})" if record.line else record.path  # or --question
    others = {1: "", 2: "; 1 more record is cut too"}.get(len(cut), f"; {len(cut) - 1} more records are cut too")
    log.warning("%s: its prompt is %d tokens and max_input_tokens keeps the last %d, as the original did: its "
                "beginning is not seen%s (max_input_tokens: 0 keeps every token)", name, length, cfg.max_input_tokens,
                others)


def pad_batch(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id rows to the longest; returns (input_ids, attention_mask) with 0 on pads. (torch is imported here: the
    prompt itself is checked before torch loads, by generate.py's one question and serve.py.)"""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask

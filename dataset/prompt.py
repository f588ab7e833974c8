"""Prompt text and token ids exactly as the original builds them.

Quirks reproduced on purpose (they change answers):
- `lower_text` lowers the whole formatted prompt, template included ("User:" becomes "user:").
- Only the LAST `max_input_tokens` ids of [BOS] + pieces are kept, so a long prompt loses its BOS and beginning.
"""
from __future__ import annotations

import sentencepiece as spm
import torch

from dataset.errors import RecordError


class LynxTokenizer:
    """Vicuna's sentencepiece model plus the `[PAD]` token Lynx appends (id = the sentencepiece vocab size)."""

    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.sp.get_piece_size()
        self.special_ids = {self.bos_id, self.eos_id, self.unk_id, self.pad_id}

    @property
    def vocab_size(self) -> int:
        return self.pad_id + 1

    def encode(self, text: str, max_tokens: int) -> list[int]:
        ids = [self.bos_id] + self.sp.encode(text)
        return ids[-max_tokens:]

    def decode(self, ids) -> str:
        """Text of generated ids, special tokens skipped, stripped (the original's batch_decode + strip)."""
        ids = [int(i) for i in ids if int(i) not in self.special_ids]
        return self.sp.decode(ids).strip()


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

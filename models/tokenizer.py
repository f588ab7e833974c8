"""Vicuna's sentencepiece tokenizer with the `[PAD]` token Lynx appends, built beside the LLM it belongs to."""
from __future__ import annotations

import sentencepiece as spm


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

"""Vicuna's sentencepiece tokenizer with the `[PAD]` token Lynx appends, built beside the LLM it belongs to."""
from __future__ import annotations

import os
import re

import sentencepiece as spm

from models.weight_files import llm_folder

PAD_TEXT = "[PAD]"


class LynxTokenizer:
    """Vicuna's sentencepiece model plus the `[PAD]` token Lynx appends (id = the sentencepiece vocab size).

    Text is split as the original's slow LLaMA tokenizer (transformers 4.28) split it: the texts `<s>`, `</s>`,
    `<unk>` and `[PAD]` anywhere in a prompt become those special ids; the text between them is encoded piece by
    piece (each with sentencepiece's own leading-space marker). `[PAD]` was added as a plain string, so the
    whitespace on both sides of it is dropped; `<s>`, `</s>`, `<unk>` keep their neighbours' whitespace."""

    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.pad_id = self.sp.get_piece_size()
        self.special_ids = {self.bos_id, self.eos_id, self.unk_id, self.pad_id}
        self.special_texts = {self.sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id)}
        self.special_texts[PAD_TEXT] = self.pad_id
        self.strips_around = {PAD_TEXT}
        longest_first = sorted(self.special_texts, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    @classmethod
    def of(cls, cfg) -> "LynxTokenizer":
        """The tokenizer in the config's LLM folder."""
        return cls(os.path.join(llm_folder(cfg), "tokenizer.model"))

    @property
    def vocab_size(self) -> int:
        return self.pad_id + 1

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """BOS + the text's ids, then only the last `max_tokens` (the original's truncation, BOS lost if long);
        `max_tokens` 0 or less keeps them all, as the original did."""
        ids = [self.bos_id] + self.text_ids(text)
        return ids[-max_tokens:] if max_tokens > 0 else ids

    def text_ids(self, text: str) -> list[int]:
        """The ids of `text` without BOS."""
        parts = [part for part in self._splitter.split(text) if part]
        for i, part in enumerate(parts):
            if part in self.strips_around:
                if i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        ids = []
        for part in parts:
            if part in self.special_texts:
                ids.append(self.special_texts[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids, strip: bool = True) -> str:
        """Text of generated ids, special tokens skipped, stripped (the original's batch_decode + strip; its
        lemmatizer came between the two: `strip=False`)."""
        ids = [int(i) for i in ids if int(i) not in self.special_ids]
        text = self.sp.decode(ids)
        return text.strip() if strip else text

"""The decoding options of one answer, as a value: LYNX.yaml's decoding keys, or a server request's.

Names and meanings are the original's config keys, so a message about a bad value names the key a user wrote.
`min_length` counts as the original's transformers 4.28 counted it: the output began with a one-token BOS
placeholder, so `min_length: 2` means "EOS may not be the first new token".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from errors import InputError


_INTEGERS = ("max_new_tokens", "min_length", "num_beams", "top_k", "no_repeat_ngram_size")
_NUMBERS = ("temperature", "top_p", "length_penalty", "repetition_penalty")


@dataclass(frozen=True)
class DecodingSettings:
    """Frozen and hashable: a decoder resolves each distinct value once. Built from a config (`from_config`), then
    varied per call (`replace`)."""

    max_new_tokens: int
    min_length: int
    num_beams: int
    use_nucleus_sampling: bool
    temperature: float
    top_k: int
    top_p: float
    no_repeat_ngram_size: int
    length_penalty: float
    repetition_penalty: float

    @property
    def do_sample(self) -> bool:
        return self.use_nucleus_sampling

    @classmethod
    def from_config(cls, cfg) -> "DecodingSettings":
        """The settings of a LynxConfig (or anything with the same attributes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def replace(self, **changes) -> "DecodingSettings":
        """These settings with some keys changed, checked."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InputError(f"unknown decoding key '{unknown[0]}'")
        return dataclasses.replace(self, **changes).checked()

    def checked(self, where: str = "decoding") -> "DecodingSettings":
        """Self, or InputError naming the key, the value and what is allowed."""
        problem = self.problem()
        if problem:
            raise InputError(f"{where}: {problem}")
        return self

    def problem(self) -> str | None:
        """What is wrong with these settings, in one line, or None."""
        for name in _INTEGERS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                return f"'{name}' must be an integer, got {value!r}"
        for name in _NUMBERS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"'{name}' must be a number, got {value!r}"
        if not isinstance(self.use_nucleus_sampling, bool):
            return f"'use_nucleus_sampling' must be true or false, got {self.use_nucleus_sampling!r}"
        if self.max_new_tokens < 1:
            return f"'max_new_tokens' must be at least 1, got {self.max_new_tokens}"
        if self.num_beams < 1:
            return f"'num_beams' must be at least 1, got {self.num_beams}"
        if not 0 <= self.min_length <= self.max_new_tokens + 1:
            return (f"'min_length' must be between 0 and max_new_tokens + 1 = {self.max_new_tokens + 1} (it counts "
                    f"a placeholder token, as the original did), got {self.min_length}")
        if self.use_nucleus_sampling and not (self.temperature > 0 and math.isfinite(self.temperature)):
            return (f"'temperature' must be a number greater than 0 when sampling (use_nucleus_sampling: true), "
                    f"got {self.temperature}")
        if self.top_k < 0:
            return f"'top_k' must be 0 (no top-k) or more, got {self.top_k}"
        if not 0 < self.top_p <= 1:
            return f"'top_p' must be greater than 0 and at most 1, got {self.top_p}"
        if self.no_repeat_ngram_size < 0:
            return f"'no_repeat_ngram_size' must be 0 (off) or more, got {self.no_repeat_ngram_size}"
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            return f"'repetition_penalty' must be a number greater than 0, got {self.repetition_penalty}"
        if not math.isfinite(self.length_penalty):
            return f"'length_penalty' must be a finite number, got {self.length_penalty}"
        return None

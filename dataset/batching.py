"""From records to model batches: a torch Dataset that loads media in DataLoader workers, and the collate rule.

A record whose media or prompt cannot be used becomes an item with an error instead of stopping the run, so the
caller decides (log it and go on, or stop with --strict).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from configs.schema import LynxConfig
from dataset.media import MediaOptions, load_pixels
from dataset.prompt import format_prompt, pad_batch
from dataset.records import Record
from errors import RecordError


@dataclass
class Item:
    """One record or request made ready for the model: its pixels and prompt ids, or the RecordError that stopped
    it. `position` is where it sits in the caller's list (the dataset's records, the API's pairs)."""

    position: int
    pixel_values: torch.Tensor | None = None
    input_ids: list[int] | None = None
    error: RecordError | None = None


class Preparer:
    """What a record or a request becomes for the model, each part made once: the prompt filled and tokenized, the
    media read into pixels. One per pipeline, shared by the dataset of a run and every other front end."""

    def __init__(self, cfg: LynxConfig, tokenizer, media: MediaOptions):
        self.template, self.lower_text, self.max_input_tokens = cfg.prompt, cfg.lower_text, cfg.max_input_tokens
        self.tokenizer = tokenizer
        self.media = media

    @classmethod
    def from_config(cls, cfg: LynxConfig, tokenizer) -> "Preparer":
        return cls(cfg, tokenizer, MediaOptions.from_config(cfg))

    def prompt_ids(self, fields: dict, index=None) -> list[int]:
        """The prompt's token ids: the template filled with the fields, tokenized (RecordError if it cannot be)."""
        return self.tokenizer.encode(format_prompt(self.template, fields, self.lower_text, index),
                                     self.max_input_tokens)

    def pixels(self, media, kind: str | None, index=None, rng=None) -> torch.Tensor:
        """The pixels of one media value (dataset.media.load_pixels; `kind` None: inferred from the value)."""
        return load_pixels(media, kind, self.media, index, rng=rng)

    def item(self, position: int, media, kind: str | None, fields: dict, index=None) -> Item:
        """An Item of a media value and the prompt's fields; RecordError (naming `index`) if it cannot be made."""
        input_ids = self.prompt_ids(fields, index)
        return Item(position, self.pixels(media, kind, index), input_ids)


class LynxEvalDataset(Dataset):
    """Item i: the pixels and prompt ids of records[i], or the RecordError that stopped it. `vision_key`: the
    config's vision_prompt_dict; `seed`: the run's, for random frame choices."""

    def __init__(self, records: list[Record], prepare: Preparer, vision_key: str, seed: int = 0):
        self.records = records
        self.prepare = prepare
        self.vision_key = vision_key
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> Item:
        record = self.records[position]
        try:
            input_ids = self.prepare.prompt_ids(record.fields, record.index)
            value = record.media(self.vision_key)
            pixels = self.prepare.pixels(value, record.media_kind(self.vision_key), record.index,
                                         rng=self.prepare.media.frame_rng(self.seed, record.index, value))
        except RecordError as err:
            return Item(position, error=err)
        return Item(position, pixels, input_ids)


@dataclass
class Batch:
    positions: list  # dataset positions of the usable records, in row order
    pixel_values: torch.Tensor | None
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    failures: list = field(default_factory=list)  # (position, RecordError)

    def __len__(self) -> int:
        return len(self.positions)

    def part(self, rows: slice, left_pad: bool) -> "Batch":
        """Some rows, re-trimmed so that they equal collating those records alone."""
        ids, mask = self.input_ids[rows], self.attention_mask[rows]
        span = mask.any(dim=0).nonzero()
        cols = slice(int(span.min()), int(span.max()) + 1) if left_pad else slice(0, int(span.max()) + 1)
        return Batch(self.positions[rows], self.pixel_values[rows], ids[:, cols], mask[:, cols])


class Collator:
    """Stack pixels and pad prompt ids (left or right, with the [PAD] id) of the usable items of a batch."""

    def __init__(self, pad_id: int, left_pad: bool):
        self.pad_id = pad_id
        self.left_pad = left_pad

    def __call__(self, items: list[Item]) -> Batch:
        good = [item for item in items if item.error is None]
        failures = [(item.position, item.error) for item in items if item.error is not None]
        if not good:
            return Batch([], None, None, None, failures)
        input_ids, mask = pad_batch([item.input_ids for item in good], self.pad_id, self.left_pad)
        pixels = torch.stack([item.pixel_values for item in good])
        return Batch([item.position for item in good], pixels, input_ids, mask, failures)


def batches_by_media(records: list[Record], positions: list[int], vision_key: str, batch_size: int) -> list[list[int]]:
    """Consecutive positions grouped into batches of at most batch_size that never mix images and videos."""
    batches, current, kind = [], [], None
    for position in positions:
        this_kind = records[position].media_kind(vision_key)
        if current and (this_kind != kind or len(current) == batch_size):
            batches.append(current)
            current = []
        current.append(position)
        kind = this_kind
    if current:
        batches.append(current)
    return batches

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
    """One record made ready for the model: its pixels and prompt ids, or the RecordError that stopped it.
    `position` is where the record sits in the caller's list (the dataset's records, the API's pairs)."""

    position: int
    pixel_values: torch.Tensor | None = None
    input_ids: list[int] | None = None
    error: RecordError | None = None


class LynxEvalDataset(Dataset):
    """Item i: the pixels and prompt ids of records[i], or the RecordError that stopped it."""

    def __init__(self, records: list[Record], cfg: LynxConfig, tokenizer, seed: int = 0):
        self.records = records
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.seed = seed
        self.media = MediaOptions.from_config(cfg)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> Item:
        record = self.records[position]
        try:
            text = format_prompt(self.cfg.prompt, record.fields, self.cfg.lower_text, record.index)
            input_ids = self.tokenizer.encode(text, self.cfg.max_input_tokens)
            value = record.media(self.cfg.vision_prompt_dict)
            pixels = load_pixels(value, record.media_kind(self.cfg.vision_prompt_dict), self.media, record.index,
                                 rng=self.media.frame_rng(self.seed, record.index, value))
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

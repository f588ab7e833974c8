"""The random draws of sampled decoding, and which generator they come from.

transformers 4.28 (the original's) draws with `torch.multinomial(probs, n)`: without replacement, n samples per row.
On the CPU that call is used as is, on the exact shapes 4.28 used, so a seeded batch draws what the original drew.
On CUDA, `torch.multinomial` checks its input with a host sync and cannot be captured in a CUDA graph; the same draw
is written out as torch computes it (`argmax`/`topk` of probs / Exp(1) noise): the same distribution, on the CPU
even the same numbers (tests/test_decoding_rules.py), but on CUDA the fixed batch shape and the kernels give other
numbers.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def draw(probs: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n indices per row of `probs` (rows, choices), without replacement, in proportion to the probabilities."""
    if probs.device.type == "cpu":
        return torch.multinomial(probs, n, generator=generator)
    return exponential_race(probs, n, generator)


def exponential_race(probs: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`torch.multinomial` without replacement as torch computes it, minus its input checks (a host sync): each
    choice gets an Exp(1) arrival time divided into its probability; the n largest quotients win."""
    quotients = probs / torch.empty_like(probs).exponential_(generator=generator)
    if n == 1:
        return quotients.argmax(dim=-1, keepdim=True)
    return quotients.topk(n, dim=-1).indices


@contextmanager
def lending(source: torch.Generator, borrower: torch.Generator):
    """For the duration, `borrower` draws `source`'s stream; afterwards `source` continues where the draws stopped
    and `borrower` is as it was. For code that can only draw from a generator of its own: transformers' `generate`
    draws from the device's default generator, captured CUDA graphs from the generator registered with them."""
    saved = borrower.get_state()
    borrower.set_state(source.get_state())
    try:
        yield
    finally:
        source.set_state(borrower.get_state())
        borrower.set_state(saved)


@contextmanager
def drawing_from(generator: torch.Generator | None, device: torch.device):
    """`device`'s default generator draws `generator`'s stream for the duration (see `lending`)."""
    if generator is None:
        yield
        return
    device = torch.device(device)
    if generator.device.type != device.type:
        raise ValueError(f"a generator on {generator.device} cannot draw for {device}: make it on {device}")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        default = torch.cuda.default_generators[index]
    else:
        default = torch.default_generator
    with lending(generator, default):
        yield

"""This process's place among the processes of one run, and their meetings (torch.distributed).

torchrun and accelerate launch start one process per GPU, on one machine or several, and tell each its rank in
environment variables. A plain `python generate.py` is process 0 of 1: it never joins a group and every meeting
returns at once, so a single run and a run of many processes go through the same code.

Only small Python objects pass between processes, so the gloo backend serves CPU and GPU runs alike, and a process
that dies is noticed by the others at their next meeting (after loading the model, at the end). torch is imported
when the processes join, not when this module is: the checks that come before answer in a second.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

from errors import InputError

# How long a process waits at a meeting for one that is alive but silent. Shares differ by at most a batch, so the
# wait at the end is short unless a process is stuck.
WAIT = timedelta(minutes=30)


class RankLost(InputError):
    """Another process of the run failed or was stopped: reported in one line, like an input problem (exit 1)."""


def _cause(err: BaseException) -> str:
    """The first sentence of a torch.distributed error, without the C++ source location in front."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())
    return re.split(r"\.\s|\n", text)[0].strip() or type(err).__name__


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=os.environ) -> "Processes":
        """From the variables torchrun and accelerate launch set; without them, process 0 of 1."""
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def prefix(self) -> str:
        """Of this process's messages, so that interleaved lines name their process."""
        return f"rank {self.rank}: " if self.several else ""

    def join(self, requested_device: str | None) -> str:
        """Check the device and join the other processes; returns this process's device: with several processes
        and --device cuda or unset, each one's own GPU (cuda:LOCAL_RANK). A GPU named by number (cuda:1) becomes
        this thread's current device, so that no CUDA call lands on GPU 0 by default."""
        import torch

        from lynx.pipeline import check_device, default_device

        device = requested_device or default_device()
        check_device(device)
        if not self.several:
            if torch.device(device).type == "cuda" and torch.device(device).index is not None:
                torch.cuda.set_device(device)
            return device
        import torch.distributed as dist

        if device == "cuda":
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise InputError(f"local rank {self.local_rank} has no GPU: {count} visible on this machine; start "
                                 f"at most {count} processes per machine (--nproc_per_node)")
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        try:
            dist.init_process_group("gloo", timeout=WAIT)
        except (RuntimeError, ValueError) as err:
            raise RankLost(f"cannot join the other processes: {_cause(err)}") from None
        return device

    # ---- meetings: every process calls the same ones in the same order
    def all_gather(self, value) -> list:
        """Every process's `value`, by rank, on every process."""
        if not self.several:
            return [value]
        everyone = [None] * self.world_size
        self._meet("all_gather_object", everyone, value)
        return everyone

    def gather(self, value) -> list | None:
        """Every process's `value`, by rank, on process 0; None on the others."""
        if not self.several:
            return [value]
        everyone = [None] * self.world_size if self.is_main else None
        self._meet("gather_object", value, everyone)
        return everyone

    def broadcast(self, value):
        """Process 0's `value`, on every process."""
        if not self.several:
            return value
        box = [value]
        self._meet("broadcast_object_list", box)
        return box[0]

    def leave(self) -> None:
        """Wait until every process is here (so that none exits, and gets the others stopped, before all are done),
        then leave the group."""
        if not self.several:
            return
        import torch.distributed as dist

        self._meet("barrier")
        dist.destroy_process_group()

    def _meet(self, collective: str, *args) -> None:
        import torch.distributed as dist

        try:
            getattr(dist, collective)(*args)
        except RuntimeError as err:
            raise RankLost(f"lost contact with the other processes ({_cause(err)}): one of them failed or was "
                           f"stopped (see its message); finished answers are kept: run the same command again to "
                           f"resume") from None

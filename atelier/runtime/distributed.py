"""Data-parallel training across processes (training.num_processes > 1).

Every process holds the same LoRA network and optimizer and trains its own share
of each epoch's batches (atelier.conditioning.training_data.shard). After each backward pass the
processes average their LoRA gradients, so every process takes the same optimizer
step; they also agree on the logged loss and on whether a stop signal came. Only
the main process writes outputs.

Collectives go through accelerate's helpers (gloo on CPU, NCCL on GPUs). The
network is not wrapped in DistributedDataParallel: it never runs a forward of its
own (its modules are patched into the base model), and one all-reduce of the
flattened LoRA gradients per optimizer step is all the synchronisation needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from accelerate import Accelerator


def process_rank() -> int:
    """This process's rank in a data-parallel run (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def in_worker() -> bool:
    """Whether this process is one of a data-parallel run's processes."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class DataParallel:
    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.is_main = accelerator.is_main_process

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every process's gradients by their mean over the processes.

        A parameter without a gradient (module dropout skipped it) counts as zero,
        so all processes reduce tensors of the same layout.
        """
        if not self.active:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def agree(self, loss: float, signal: int | None) -> tuple[float, int | None]:
        """The mean loss over the processes, and the signal any of them got (or None)."""
        if not self.active:
            return loss, signal
        mine = torch.tensor([[loss, float(signal or 0)]], device=self.accelerator.device)
        every = self.accelerator.gather(mine).reshape(-1, 2)
        agreed = int(every[:, 1].max().item())
        return float(every[:, 0].mean().item()), agreed or None

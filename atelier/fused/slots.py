"""One frozen base layer, K adapters: the base runs once on the whole batch, each adapter
adds its update to its own rows.

`LaneRouter` says, for the forward in progress, which rows of the batch belong to which
lane (`fused(...)`), or that one lane runs alone (`only(k)`: validation, sampling,
anything outside a training step). Every patched base layer (`Slot`) reads it:

    out = base(x)                                  # once, all rows
    out[s_k:e_k] = lane_k.forward(x[s_k:e_k])      # with lane_k's base output = out[s_k:e_k]

Each lane's module is an ordinary, unapplied network module (LoRAModule): its forward
computes `self._base_forward(x) + update`; a Slot hands it the rows of the base output
already computed, so the module's own arithmetic (scale, multiplier, dtype casts) is
exactly the one a solo run does. Rows never mix: the UNet is per sample (GroupNorm,
attention, convolutions), the base weights are frozen (no weight gradient sums over
rows), and lane k's parameters only see rows s_k:e_k; so the gradient of the sum of the
lanes' losses is, for each lane, the gradient of its own loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from atelier.network.patch import PatchedLayer


@dataclass(frozen=True)
class Rows:
    lane: int
    start: int
    end: int


class LaneRouter:
    """Which lane owns which rows of the forward in progress (shared by all Slots)."""

    def __init__(self) -> None:
        self.rows: tuple[Rows, ...] | None = None
        self.solo: int | None = None

    @contextmanager
    def fused(self, lanes_and_sizes: list[tuple[int, int]]) -> Iterator[tuple[Rows, ...]]:
        """Rows for lanes in order: [(lane, batch size), ...] -> consecutive row ranges."""
        rows, start = [], 0
        for lane, size in lanes_and_sizes:
            rows.append(Rows(lane, start, start + size))
            start += size
        previous = self.rows, self.solo
        self.rows, self.solo = tuple(rows), None
        try:
            yield self.rows
        finally:
            self.rows, self.solo = previous

    @contextmanager
    def only(self, lane: int) -> Iterator[None]:
        """Lane `lane`'s adapter alone, on any batch (the model as its solo run sees it)."""
        previous = self.rows, self.solo
        self.rows, self.solo = None, lane
        try:
            yield
        finally:
            self.rows, self.solo = previous


class Slot(PatchedLayer):
    """Patches one base layer's forward (PatchedLayer's apply_to / restore); holds each
    lane's module for it in `lanes` (None = the lane has no module on this layer).

    The lane modules are kept in a plain list, not registered: each belongs to its lane's
    network (saved, optimised and moved there)."""

    def __init__(self, base: nn.Module, router: LaneRouter, num_lanes: int):
        super().__init__("fused_slot", base)
        self.router = router
        self.lanes: list[nn.Module | None] = [None] * num_lanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self.router
        if router.rows is None:
            module = self.lanes[router.solo] if router.solo is not None else None
            return self._base_forward(x) if module is None else _with_base_output(module, x, self._base_forward(x))
        out = self._base_forward(x)
        total = router.rows[-1].end
        if x.shape[0] != total:
            raise RuntimeError(
                f"fused forward: a patched layer got {x.shape[0]} rows, the lanes hold {total}; "
                "this model reshapes the batch dimension before a targeted layer"
            )
        # split, not out[s:e]: a slice's backward writes a zero tensor of the whole batch per
        # lane (K^2 work per layer); split's backward is one cat.
        sizes = [rows.end - rows.start for rows in router.rows]
        pieces = []
        for rows, x_rows, out_rows in zip(router.rows, x.split(sizes), out.split(sizes)):
            module = self.lanes[rows.lane]
            pieces.append(out_rows if module is None else _with_base_output(module, x_rows, out_rows))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _with_base_output(module: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """module.forward(x), its base layer's output being `base_out` (computed once, outside)."""
    module._base_forward = lambda _x: base_out
    try:
        return module.forward(x)
    finally:
        module._base_forward = None


def install_slots(networks: list, router: LaneRouter) -> list[Slot]:
    """One Slot per base layer any lane's network targets; the networks stay unapplied."""
    slots: dict[int, Slot] = {}
    for lane, network in enumerate(networks):
        for module in network.loras.values():
            slot = slots.get(id(module.base))
            if slot is None:
                slot = slots[id(module.base)] = Slot(module.base, router, len(networks))
            slot.lanes[lane] = module
    for slot in slots.values():
        slot.apply_to()
    return list(slots.values())


def remove_lane(slots: list[Slot], lane: int) -> None:
    """A lane that left: its modules are no longer called (its rows are no longer sent)."""
    for slot in slots:
        slot.lanes[lane] = None

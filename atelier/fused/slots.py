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

Consecutive lanes whose plain LoRA modules have the same rank and the same number of rows
are computed together (`BatchedLoRA`): their down / up weights stacked, two batched
matmuls for all of them. The formula is the solo one, `out + up(down(x)) * multiplier *
alpha / rank`, computed once for the run of lanes instead of once per lane: a GPU step is
bound by the host launching ops (BENCHMARKS.md, "GPU check"), and each lane's own ops
made a fused step of 8 lanes dispatch 5.6x the ops of a solo step. The batched matmul may
sum in another order than the solo one: equal to rounding, not bitwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from atelier.fused.lane_logs import as_lane
from atelier.network.flux_lora import FusedLoRAModule
from atelier.network.lora import LoRAModule
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

    @contextmanager
    def alone(self, lane: int) -> Iterator[None]:
        """Lane `lane` alone in the model and in the logs (its validation, samples, saving)."""
        with self.only(lane), as_lane(lane):
            yield


class Slot(PatchedLayer):
    """Patches one base layer's forward (PatchedLayer's apply_to / restore); holds each
    lane's module for it in `lanes` (None = the lane has no module on this layer).

    The lane modules are kept in a plain list, not registered: each belongs to its lane's
    network (saved, optimised and moved there)."""

    def __init__(self, base: nn.Module, router: LaneRouter, num_lanes: int):
        super().__init__("fused_slot", base)
        self.router = router
        self.lanes: list[nn.Module | None] = [None] * num_lanes
        self._batched = BatchedLoRA()

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
        runs = self._runs(router.rows)
        sizes = [run[-1].end - run[0].start for run in runs]
        pieces = []
        for run, x_rows, out_rows in zip(runs, x.split(sizes), out.split(sizes)):
            if len(run) > 1:
                pieces.append(self._batched.forward([self.lanes[r.lane] for r in run], x_rows, out_rows))
                continue
            module = self.lanes[run[0].lane]
            pieces.append(out_rows if module is None else _with_base_output(module, x_rows, out_rows))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _runs(self, rows: tuple[Rows, ...]) -> list[list[Rows]]:
        """The lanes in row order, consecutive lanes that can be batched together in one run."""
        runs: list[list[Rows]] = []
        last_key = None
        for r in rows:
            key = BatchedLoRA.key(self.lanes[r.lane], r.end - r.start)
            if key is not None and key == last_key:
                runs[-1].append(r)
            else:
                runs.append([r])
            last_key = key
        return runs


class BatchedLoRA:
    """Several plain LoRA modules of one base layer, each on its own equal share of rows,
    computed with two batched matmuls; their scales (multiplier x alpha / rank, Python
    floats) are kept as one tensor, made again only when one of them changes."""

    def __init__(self) -> None:
        self._scales: tuple[tuple[float, ...], torch.Tensor] | None = None

    @staticmethod
    def key(module: nn.Module | None, rows: int) -> tuple | None:
        """Modules with equal keys batch together; None: this module runs alone. Only a plain
        LoRA on a Linear or 1x1 Conv2d layer whose training step draws nothing at random."""
        if type(module) is not LoRAModule:
            return None
        down = module.lora_down
        # A 1x1 conv batches as a matmul when each lane has one row (the usual batch 1 per
        # lane); with more, its channels-first rows would need copies that cost more ops.
        if isinstance(down, nn.Conv2d) and ((down.kernel_size, down.stride, down.padding) != ((1, 1), (1, 1), (0, 0))
                                            or rows != 1):
            return None
        if module.training and (module.dropout or module.rank_dropout or module.module_dropout):
            return None
        return module.rank, rows, type(down), down.weight.dtype, down.weight.device

    def forward(self, modules: list[LoRAModule], x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + up(down(x)) * scale, each module on its own consecutive 1/K of the rows."""
        down = torch.stack([m.lora_down.weight for m in modules])  # [K, rank, in] (conv: [K, rank, C, 1, 1])
        up = torch.stack([m.lora_up.weight for m in modules])  # [K, out, rank] (conv: [K, out, rank, 1, 1])
        x = x.to(down.dtype)
        if x.ndim == 4:  # a 1x1 conv, one row per lane: [K, C, H*W], channels first
            update = torch.bmm(up.flatten(2), torch.bmm(down.flatten(2), x.flatten(2)))
        else:  # a linear layer: [K, rows * tokens, in]
            update = torch.bmm(torch.bmm(x.reshape(len(modules), -1, x.shape[-1]), down.transpose(1, 2)),
                               up.transpose(1, 2))
        update = update * self._scale_tensor(modules, update.device)
        return (base_out.reshape(update.shape) + update.to(base_out.dtype)).reshape(base_out.shape)

    def _scale_tensor(self, modules: list[LoRAModule], device: torch.device) -> torch.Tensor:
        """[K, 1, 1] in float32: the product is rounded once, as a solo module's
        `update * python_float` is."""
        values = tuple(m.multiplier * m.scale for m in modules)
        cached = self._scales
        if cached is None or cached[0] != values or cached[1].device != device:
            scales = torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)
            self._scales = cached = (values, scales)
        return cached[1]


def _with_base_output(module: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    """module.forward(x), its base layer's output being `base_out` (computed once, outside)."""
    module._base_forward = lambda _x: base_out
    try:
        return module.forward(x)
    finally:
        module._base_forward = None


class FusedPart:
    """Part i of a lane's FusedLoRAModule (FLUX's fused BFL layers: atelier.network.flux_lora), as
    the Slot of that part's diffusers Linear sees one module: `forward(x)` is the module's
    part_forward(i, x) over the base output the Slot computed (`_base_forward`, set by
    _with_base_output). The parts of a lane are called on row slices that are new tensors each,
    so each part computes the shared low rank itself (the same values: fused lanes have no dropout)."""

    def __init__(self, module: FusedLoRAModule, index: int):
        self.module, self.index = module, index
        self._base_forward = None

    @property
    def base(self) -> nn.Module:
        return self.module.parts[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        module._part_forwards = [self._base_forward if j == self.index else None for j in range(len(module.parts))]
        try:
            return module.part_forward(self.index, x)
        finally:
            module._part_forwards = None
            module._shared = None  # no activation held past this call


def _lane_layers(module: nn.Module) -> list:
    """The (base layer, what its Slot calls) pairs of one lane module: itself, or a fused one's parts."""
    if isinstance(module, FusedLoRAModule):
        return [FusedPart(module, i) for i in range(len(module.parts))]
    return [module]


def install_slots(networks: list, router: LaneRouter) -> list[Slot]:
    """One Slot per base layer any lane's network targets; the networks stay unapplied."""
    slots: dict[int, Slot] = {}
    for lane, network in enumerate(networks):
        for layer in (part for module in network.loras.values() for part in _lane_layers(module)):
            slot = slots.get(id(layer.base))
            if slot is None:
                slot = slots[id(layer.base)] = Slot(layer.base, router, len(networks))
            slot.lanes[lane] = layer
    for slot in slots.values():
        slot.apply_to()
    return list(slots.values())


def remove_lane(slots: list[Slot], lane: int) -> None:
    """A lane that left: its modules are no longer called (its rows are no longer sent)."""
    for slot in slots:
        slot.lanes[lane] = None

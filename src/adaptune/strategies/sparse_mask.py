"""``sparse_mask``: sparse fine-tuning by gradient magnitude (SIFT, Song et al., ICML 2024;
GPS, Zhang et al., CVPR 2024): only the ``density`` fraction of the pretrained body's weights
with the largest gradient magnitude update; the new head trains whole. The gradient is that of
the mean loss over the training split (in batches of ``train.batch_size``), taken once at the
start of training from the model as loaded, in eval mode (as ChildTuning-D's Fisher, and the
importance stage, are), and the entries are chosen by ``scope``:

- ``tensor``: the top ``density`` of each tensor's entries (SIFT's per-tensor selection); the
  plan states each tensor's count exactly;
- ``body``: the top ``density`` of all the body's entries together, so a tensor's share
  follows its gradients;
- ``row``: the top ``density`` of each output row of every matrix (each neuron's incoming
  connections, GPS's rule), vectors as in ``tensor``.

An entry whose gradient is exactly zero is never chosen (an embedding row of a token the split
never shows), so a tensor can end below its density. Which entries update is known once the
run has its gradients: the run records each tensor's density (``strategy_record`` in
``train_summary.json``, and MLflow). Masked entries stay bit-identical: their gradients are
zeroed before the optimizer step (so clipping and the optimizer's moments see only the kept
entries) and, after the step, their weights are written back from a copy of the pretrained
values, which undoes (decoupled) weight decay too. The optimizer state is dense and masked,
not sparse: the optimizer holds moments for every entry of every trainable tensor (the masked
entries' stay zero), so ``optimizer_state_bytes`` is full fine-tuning's, and the copy of the
pretrained body costs one more copy of its weights. Its memory saving, SIFT's point, is not
made here; its choice of what trains is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from adaptune.importance import mean_gradient, scoring_mode
from adaptune.layers import output_dim
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import (
    StrategyKind,
    TrainingContext,
    TrainingHooks,
    stepped_tensors,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparseMaskSettings:
    density: float
    scope: str


def kept_count(numel: int, density: float) -> int:
    """Entries a tensor of ``numel`` keeps at ``density`` (at least one)."""
    return max(1, round(density * numel))


def build(tables: ScoreTables, settings: SparseMaskSettings) -> list[TensorPlan]:
    tensors = []
    for row in tables.rows():
        if row.is_head:
            tensors.append(TensorPlan.from_row(row, False, 1.0, "head: new; every entry trains"))
            continue
        if settings.scope == "tensor":
            how = (
                f"the top {kept_count(row.numel, settings.density):,} of {row.numel:,} "
                "entries by |gradient| at training start update"
            )
        elif settings.scope == "row":
            how = f"the top {settings.density:.2%} of each output row by |gradient| update"
        else:
            how = (
                f"its entries among the body's top {settings.density:.2%} by |gradient| "
                "update (share recorded by the run)"
            )
        tensors.append(TensorPlan.from_row(row, False, 1.0, f"sparse_mask: {how}"))
    return tensors


def top_entries(magnitude: torch.Tensor, density: float, scope: str) -> torch.Tensor:
    """The mask (bool, the tensor's shape) of the top ``density`` of one tensor's entries by
    ``magnitude``: over the whole tensor, or per output row (``scope: row``, matrices)."""
    if scope == "row" and magnitude.ndim >= 2:
        rows = magnitude.reshape(magnitude.shape[0], -1)
        chosen = torch.topk(rows, kept_count(rows.shape[1], density), dim=1).indices
        mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, chosen, True)
        return mask.reshape(magnitude.shape)
    flat = magnitude.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, kept_count(flat.numel(), density)).indices] = True
    return mask.reshape(magnitude.shape)


def choose_masks(
    magnitudes: dict[str, torch.Tensor], density: float, scope: str
) -> dict[str, torch.Tensor]:
    """Each tensor's mask of entries that update (see the module docstring); an entry with a
    zero gradient is never kept."""
    if scope == "body":
        flat = torch.cat([m.flatten() for m in magnitudes.values()])
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.topk(flat, kept_count(flat.numel(), density)).indices] = True
        masks, start = {}, 0
        for name, magnitude in magnitudes.items():
            masks[name] = chosen[start : start + magnitude.numel()].reshape(magnitude.shape)
            start += magnitude.numel()
    else:
        masks = {n: top_entries(m, density, scope) for n, m in magnitudes.items()}
    return {n: masks[n] & (magnitudes[n] > 0) for n in magnitudes}


class SparseMaskHooks(TrainingHooks):
    def start(self, context: TrainingContext) -> None:
        task, device = context.task, context.device
        batches = [
            {k: v.to(device) for k, v in batch.items()}
            for batch in task.modality.batches(context.train, self.train.batch_size)
        ]
        with scoring_mode(task.model):
            gradient = mean_gradient(task, batches)
        head = {t.name for t in context.plan.tensors if t.is_head}
        stepped = stepped_tensors(context)
        params = dict(task.model.named_parameters())
        body = [name for name in stepped if name not in head]
        # Rows are output units: a weight stored inputs x outputs (GPT-2's Conv1D) is chosen
        # from transposed, so that ``scope: row`` counts each unit's incoming weights there too.
        modules = dict(task.model.named_modules())
        flipped = {
            n
            for n in body
            if gradient[n].ndim == 2 and output_dim(modules[n.rpartition(".")[0]]) == 1
        }
        magnitudes = {n: gradient[n].abs().float() for n in body}
        magnitudes = {n: m.T if n in flipped else m for n, m in magnitudes.items()}
        masks = choose_masks(magnitudes, self.settings.density, self.settings.scope)
        masks = {n: m.T.contiguous() if n in flipped else m for n, m in masks.items()}
        del gradient
        # (the model's tensor, the optimizer's tensor, its mask, its pretrained values at the
        # optimizer tensor's precision: bf16 weights widen exactly to their fp32 masters)
        self.entries = [
            (params[n], stepped[n], masks[n].to(device), stepped[n].detach().clone()) for n in body
        ]
        self.density = {n: float(masks[n].float().mean()) for n in body}
        self.kept = int(sum(int(masks[n].sum()) for n in body))
        self.body = sum(masks[n].numel() for n in body)
        self.head = sum(stepped[n].numel() for n in stepped if n in head)
        log.info(
            "sparse_mask (%s): %d of %d body weights update (%.3f%%); the head's %d train whole",
            self.settings.scope,
            self.kept,
            self.body,
            100 * self.kept / max(self.body, 1),
            self.head,
        )

    def before_step(self, first_step_of_epoch: bool) -> None:
        for _, tensor, mask, _ in self.entries:
            if tensor.grad is not None:
                tensor.grad.mul_(mask)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        for param, tensor, mask, pretrained in self.entries:
            torch.where(mask, tensor, pretrained, out=tensor)
            if param is not tensor:  # bf16 weights: the master, rounded, is the weight again
                param.copy_(tensor)

    def trained_params(self, counted: int) -> int:
        return self.kept + self.head

    def record(self) -> dict[str, Any]:
        return {
            "scope": self.settings.scope,
            "density_asked": self.settings.density,
            "body_weights_updated": self.kept,
            "body_weights": self.body,
            "density": self.kept / max(self.body, 1),
            "optimizer_state": "dense, masked (moments for every entry; masked ones stay 0)",
            "density_per_tensor": self.density,
        }


KIND = StrategyKind(
    name="sparse_mask",
    build=build,
    settings=SparseMaskSettings,
    hooks=SparseMaskHooks,
    needs_head=True,
)

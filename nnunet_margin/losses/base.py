"""The protocol every loss of the package follows (plain torch, no nnU-Net).

A loss is a `SegmentationLoss`: `parts(logits, target)` returns the differentiable total and its named terms
(detached, already weighted, so they add up to the total); `forward` returns the total. Inputs are checked and
flattened once by the base class (`_inputs.flatten_inputs`), and a subclass implements only `compute(flat)`.

Checks that need tensor values (label range, finite loss) are asserted with `torch._assert_async`: on the CPU they
raise at once with the message below, on a GPU they never stall the pipeline. The nnU-Net trainers switch them off
(`check_inputs = False`) and check labels once before training and the loss value nnU-Net already copies to the
host each step.

Losses with training state get three optional hooks, which the trainers call: `start_epoch(epoch)` (schedules),
`observe_validation(logits, target)` (statistics of the full-resolution validation logits) and
`finish_validation()` (update the state from them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._inputs import FlatInputs, check_ignore_index, flatten_inputs


class LossParts(NamedTuple):
    """The loss and its named terms (detached, weighted: they add up to `total`)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


class SegmentationLoss(nn.Module):
    """Base class: logits (B, K, *spatial) of any float dtype (computed in float32 or float64), integer targets
    (B, 1, *spatial) or (B, *spatial), an optional `ignore_index` whose voxels get neither loss nor gradient.

    Subclasses implement `compute(flat) -> (total, {term: value})`; a single-term loss may return an empty mapping.
    """

    check_inputs: bool = True

    def __init__(self, ignore_index: int | None = None):
        super().__init__()
        self.ignore_index = check_ignore_index(ignore_index)

    def compute(self, flat: FlatInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def check_channels(self, logits: torch.Tensor) -> None:
        """Hook for losses with per-class state: refuse logits with the wrong number of channels."""

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> LossParts:
        """The loss and its named terms; only `total` is differentiable."""
        self.check_channels(logits)
        flat = flatten_inputs(logits, target, self.ignore_index)
        name = type(self).__name__
        if self.check_inputs:
            ignored = "" if self.ignore_index is None else f" (ignore_index={self.ignore_index} excluded)"
            torch._assert_async(flat.labels_ok, f"{name}: target holds a label outside [0, {flat.num_classes}) or a "
                                                f"non-integer value{ignored} for {flat.num_classes} logit channels; "
                                                f"check the dataset labels or set ignore_index")
        total, terms = self.compute(flat)
        if self.check_inputs:
            # the sum is finite exactly when every logit is (one pass, no logits-sized temporary)
            torch._assert_async(torch.isfinite(flat.logits.sum()), nonfinite_logits_message(name))
            torch._assert_async(torch.isfinite(total), nonfinite_loss_message(name))
        terms = {key: value.detach() for key, value in terms.items()} or {"loss": total.detach()}
        return LossParts(total, terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.parts(logits, target).total

    def start_epoch(self, epoch: int) -> str | None:
        """Called before each training epoch (0-based); returns a line for the training log, or None."""
        return None

    def observe_validation(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Called with the full-resolution logits of every validation batch of an epoch."""

    def finish_validation(self) -> str | None:
        """Called after an epoch's validation batches; returns a line for the training log, or None."""
        return None


def nonfinite_logits_message(where: str) -> str:
    return (f"{where}: the network produced NaN/inf logits. Typical fixes: lower the learning rate, check the input "
            f"normalisation, or resume from an earlier checkpoint; mixed precision overflow also shows up this way.")


def nonfinite_loss_message(where: str) -> str:
    return (f"{where}: the loss is NaN/inf although the logits are finite; please report this with the logits' "
            f"range and the loss's settings.")

"""Small DDP helpers for the trainers (torch.distributed only; nothing happens without DDP)."""

from __future__ import annotations

from typing import Any, Callable


def on_rank_zero(trainer, compute: Callable[[], Any]) -> Any:
    """`compute()` on rank 0 only; under DDP every rank receives its result, or raises its error (so no rank waits
    forever for a rank 0 that stopped)."""
    import torch.distributed as dist

    result, error = None, None
    if trainer.local_rank == 0:
        try:
            result = compute()
        except Exception as caught:  # re-raised below, on every rank
            error = caught
    if trainer.is_ddp:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def mean_over_ranks(trainer, values: dict[str, float]) -> dict[str, float]:
    """Per-key mean of `values` over all DDP ranks (every rank passes the same keys)."""
    if not trainer.is_ddp:
        return values
    import torch.distributed as dist

    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return {key: sum(rank_values[key] for rank_values in gathered) / len(gathered) for key in values}

"""Forward+backward time and peak memory of the plugin losses against nnU-Net's default Dice+CE loss.

Same logits, same targets, same run. Prints ratios (plugin / default); time is the median of several runs, memory the
peak bytes of tensor storage that the loss allocates beyond its inputs (the logits' .grad included for every loss),
in units of one logits-sized float32 buffer. Shapes: 2 x K x 64^3 with K = 4 and 14 on the CPU, 2 x K x 128^3 on a GPU.
The package's losses run as the trainers run them, with `check_inputs = False` (`--check-inputs` turns the
asynchronous label and finiteness asserts back on; their isfinite(logits) costs a few passes over the logits).
Goals (issues 2 and 3): margin calibration <= 1.5x the default's time and at most one extra logits-sized buffer;
MbLS <= 1.2x the default's time and no buffer beyond what cross-entropy needs. The compared methods
(docs/methods.md 4): pointwise losses (focal, label smoothing, ECP, CALS) <= 1.2x the default's time; neighbourhood
and binned losses (SVLS, NACL, hard and soft L1-ACE) <= 2x; none more than two extra logits-sized buffers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import median_seconds, peak_extra_bytes  # noqa: E402

from nnunet_margin.losses import SegmentationLoss  # noqa: E402
from nnunet_margin.methods import METHODS  # noqa: E402

# Settings besides a method's defaults whose cost differs (NACL's Gaussian kernel is 9 taps wide, the mean kernel 3).
MORE_SETTINGS = {"nacl": [{"kernel": "gaussian"}]}


def default_nnunet_loss():
    """nnU-Net's default loss for label-based training (as nnUNetTrainer._build_loss builds it)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def candidates(num_classes: int) -> dict:
    """nnU-Net's default loss, plain cross-entropy, then every registry method's loss with its default settings."""
    counts = torch.logspace(6, 3, num_classes)  # imbalanced: background first, rarest last
    losses = {"nnU-Net Dice+CE (default)": default_nnunet_loss(), "plain cross-entropy": torch.nn.CrossEntropyLoss()}
    for method in METHODS:
        for settings in [{}] + MORE_SETTINGS.get(method.name, []):
            name = " ".join([method.loss.__name__, *map(str, settings.values())])
            losses[name] = method.build(num_classes=num_classes, counts=counts, **settings)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="cube edge (default 64 on CPU, 128 on GPU)")
    parser.add_argument("--classes", type=int, nargs="+", default=[4, 14])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-inputs", action="store_true", help="keep the losses' asynchronous input asserts on")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or (128 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for num_classes in args.classes:
        logits = torch.randn(2, num_classes, size, size, size, device=device) * 3
        target = torch.randint(0, num_classes, (2, 1, size, size, size), device=device, dtype=torch.int16)
        logits_bytes = logits.numel() * 4
        print(f"\nlogits 2 x {num_classes} x {size}^3 ({logits_bytes / 2**20:.0f} MiB)")
        print(f"{'loss':28s} {'fwd+bwd ms':>11s} {'x default':>10s} {'peak (logits)':>14s} {'x default':>10s}")
        baseline = None
        for name, loss in candidates(num_classes).items():
            loss = loss.to(device)
            if isinstance(loss, SegmentationLoss):
                loss.check_inputs = args.check_inputs
            target_for = target[:, 0].long() if isinstance(loss, torch.nn.CrossEntropyLoss) else target

            def step(z, t, loss=loss):
                loss(z, t).backward()

            leaf = logits.clone().requires_grad_()

            def timed(loss=loss, leaf=leaf, t=target_for):
                leaf.grad = None
                loss(leaf, t).backward()

            seconds = median_seconds(timed, repeats=args.repeats)
            peak = peak_extra_bytes(step, logits.clone().requires_grad_(), target_for) / logits_bytes
            if baseline is None:
                baseline = (seconds, peak)
            print(f"{name:28s} {seconds * 1e3:11.1f} {seconds / baseline[0]:10.2f} {peak:14.2f} "
                  f"{peak / baseline[1]:10.2f}")


if __name__ == "__main__":
    main()

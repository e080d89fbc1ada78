"""`nnunet-margin benchmark`: train several calibration methods on the same folds, evaluate them the papers' way and
compare them, in one resumable command whose report always describes what it ran.

- `settings`: the settings, their checks before any step runs, and the identity that names the benchmark's folder
  ($nnUNet_results/DATASET/calibration_benchmarks/NAME; a folder never holds two studies);
- `plan`: the steps as data (command, outputs, the steps each needs), written to plan.json;
- `state`: each step's record of the inputs it consumed and the outputs it wrote (a step is done when they are
  current), and the locks (one runner per benchmark, one writer per model fold);
- `runners`: one step in its own process (what every executor runs), and the local executor;
- `report`: the report, its statistics from `nnunet_margin.comparison`;
- `command`: the command itself (`run_benchmark`, `--dry-run`, `--status`).

This package imports no nnU-Net and no torch at import time: a step's process only reads plan.json.
"""

from .command import run_benchmark
from .settings import BenchmarkSettings

__all__ = ["BenchmarkSettings", "run_benchmark"]

"""`nnunet-margin predict` against `nnUNetv2_predict` with the same folds: wall time and peak memory (goals: at most
1.10x the time and 1.5x the peak memory of nnU-Net's own prediction, in the same run).

Trains two folds of nnU-Net's own trainer briefly on 32^3 synthetic cases (4 classes), then predicts one synthetic
128^3 image with `-f 0 1` by both commands, alternately, `--repeats` times each, and reports the medians. Time is
the wall time of the whole command (start-up included). Memory is sampled every 50 ms from /proc over the command's
process tree (its preprocessing and export workers too) in three ways: the peak resident set size (RSS) of the main
process; the peak of the RSS summed over the tree, which counts pages shared by forked processes once per process
(nnUNetv2_predict forks a pool of 12 processes to list its input files, each showing the parent's ~600 MiB); and
the peak of the proportional set size (PSS) summed over the tree, which counts each shared page once in total: the
memory the command really uses. The model predicts without test-time mirroring (the demo trainer's default): the
strictest case for the ratio, since the members' statistics cost the same per member while nnU-Net's own work grows
eightfold with mirroring. Both commands get the same -npp/-nps (default 0 0: everything in one process, nnU-Net's
sequential path). Linux only (/proc). No GPU was available here: GPU figures are not measured.

Measured here (2 CPU cores, a machine shared with other jobs, about 17 minutes with the training): with -npp 0 -nps 0
time 0.99x (71.5 s against 72.2 s; an earlier run 1.03x), summed PSS 1.15x (1656 against 1439 MiB), main process
RSS 1.15x; with -npp 3 -nps 3 time 0.87x and summed PSS 0.74x (nnU-Net starts all its export workers at once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASET_ID, TRAINER = 985, "nnUNetTrainer_demo"


def run(env: dict, *command: str) -> None:
    result = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _process_tree(root_pid: int) -> list[int]:
    """The process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    parents[int(entry.name)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
    tree, frontier = [root_pid], [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree += children
        frontier += children
    return tree


def _rss_and_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes (0, 0 if it has ended)."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Pss"):
                    values[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return 0, 0
    return values.get("Rss", 0), values.get("Pss", 0)


@dataclass
class Measurement:
    seconds: float = 0.0
    main_rss: int = 0  # peak RSS of the command's own process
    tree_rss: int = 0  # peak RSS summed over the process tree (shared pages counted per process)
    tree_pss: int = 0  # peak PSS summed over the process tree (shared pages counted once)


def measure(env: dict, command: list[str]) -> Measurement:
    """Wall time and peak memory of one command (see the module docstring)."""
    start = time.perf_counter()
    process = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    result = Measurement()

    def sample() -> None:
        while process.poll() is None:
            sizes = [_rss_and_pss(pid) for pid in _process_tree(process.pid)]
            result.main_rss = max(result.main_rss, sizes[0][0])
            result.tree_rss = max(result.tree_rss, sum(rss for rss, _ in sizes))
            result.tree_pss = max(result.tree_pss, sum(pss for _, pss in sizes))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = process.communicate()[0]
    result.seconds = time.perf_counter() - start
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="cube edge of the predicted image (default 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", nargs=2, type=int, default=(0, 0), metavar=("NPP", "NPS"),
                        help="-npp and -nps of both commands (default 0 0)")
    parser.add_argument("--work", default=None, help="folder to keep the dataset and model in (reused if present)")
    args = parser.parse_args()
    from nnunet_margin.cli import trainers_path
    from nnunet_margin.nnunet.synthetic_dataset import write_synthetic_dataset

    root = Path(args.work or tempfile.mkdtemp(prefix="nnunet_margin_bench_predict_"))
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "2",
           "nnUNet_extTrainer": os.pathsep.join([str(trainers_path()), str(REPO / "demo" / "trainers")])}
    model = root / "results" / f"Dataset{DATASET_ID}_PredictBench" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    if not all((model / f"fold_{fold}" / "checkpoint_final.pth").is_file() for fold in (0, 1)):
        write_synthetic_dataset(root / "raw", dataset_id=DATASET_ID, name="PredictBench")
        run(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2")
        for fold in ("0", "1"):
            run({**env, "nnUNet_n_proc_DA": "0"}, "nnUNetv2_train", str(DATASET_ID), "3d_fullres", fold, "-tr",
                TRAINER, "-device", "cpu")
    images = root / f"test_{args.size}" / "Dataset001_Image" / "imagesTs"
    if not images.is_dir():
        write_synthetic_dataset(root / f"test_{args.size}", dataset_id=1, name="Image", num_training=0, num_test=1,
                                shape=(args.size,) * 3, seed=1)
    npp, nps = (str(value) for value in args.processes)
    common = ["-i", str(images), "-f", "0", "1", "-device", "cpu", "-npp", npp, "-nps", nps]
    commands = {
        "nnUNetv2_predict": ["nnUNetv2_predict", *common, "-o", str(root / "out_nnunet"), "-d", str(DATASET_ID),
                             "-c", "3d_fullres", "-tr", TRAINER],
        "nnunet-margin predict": ["nnunet-margin", "predict", *common, "-o", str(root / "out_margin"), "-m",
                                  str(model)],
    }
    results: dict[str, list[Measurement]] = {name: [] for name in commands}
    for repeat in range(args.repeats):
        for name, command in commands.items():
            result = measure(env, command)
            results[name].append(result)
            print(f"repeat {repeat + 1}: {name}: {result.seconds:.1f} s, peak MiB: main process RSS "
                  f"{result.main_rss / 2**20:.0f}, tree RSS {result.tree_rss / 2**20:.0f}, tree PSS "
                  f"{result.tree_pss / 2**20:.0f}", flush=True)
    medians = {name: {field: statistics.median(getattr(m, field) for m in values)
                      for field in ("seconds", "main_rss", "tree_rss", "tree_pss")}
               for name, values in results.items()}
    print(f"\n{args.size}^3 image, 4 classes, folds 0 1, -npp {npp} -nps {nps}, {os.cpu_count()} CPU cores, "
          f"medians of {args.repeats}:")
    print(f"  {'':22s} {'time':>8s} {'main RSS':>9s} {'tree RSS':>9s} {'tree PSS':>9s}")
    for name, median in medians.items():
        print(f"  {name:22s} {median['seconds']:7.1f}s" + "".join(
            f" {median[field] / 2**20:6.0f}MiB" for field in ("main_rss", "tree_rss", "tree_pss")))
    ours, baseline = medians["nnunet-margin predict"], medians["nnUNetv2_predict"]
    print("  ratio (goals: time <= 1.10x, memory <= 1.5x): " + ", ".join(
        f"{label} {ours[field] / baseline[field]:.3f}x" for label, field in
        (("time", "seconds"), ("main RSS", "main_rss"), ("tree RSS", "tree_rss"), ("tree PSS", "tree_pss"))))


if __name__ == "__main__":
    main()

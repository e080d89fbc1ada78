"""`nnunet-margin predict` against `nnUNetv2_predict` with the same folds: wall time and peak memory (goals: at most
1.10x the time and 1.5x the peak memory of nnU-Net's own prediction, in the same run).

Trains two folds of nnU-Net's own trainer briefly on 32^3 synthetic cases (4 classes), then predicts one synthetic
128^3 image with `-f 0 1` by both commands, alternately, `--repeats` times each, and reports the medians. Time is
the wall time of the whole command (start-up included); memory is the peak of the summed resident set size of the
command's process tree (its preprocessing and export workers too), sampled every 20 ms from /proc. The model
predicts without test-time mirroring (the demo trainer's default): the strictest case for the ratio, since the
members' statistics cost the same per member while nnU-Net's own work grows eightfold with mirroring. Both commands
get the same -npp/-nps (default 0 0: everything in one process, nnU-Net's sequential path). Linux only (/proc).
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASET_ID, TRAINER = 985, "nnUNetTrainer_demo"


def run(env: dict, *command: str) -> None:
    result = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def tree_rss_bytes(root_pid: int) -> int:
    """Summed resident memory of a process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(pid, 0) for pid in tree)


def measure(env: dict, command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak summed RSS in bytes of the process tree) of one command."""
    start = time.perf_counter()
    process = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = process.communicate()[0]
    seconds = time.perf_counter() - start
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return seconds, peak


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
           "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": "0",
           "nnUNet_extTrainer": os.pathsep.join([str(trainers_path()), str(REPO / "demo" / "trainers")])}
    model = root / "results" / f"Dataset{DATASET_ID}_PredictBench" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    if not all((model / f"fold_{fold}" / "checkpoint_final.pth").is_file() for fold in (0, 1)):
        write_synthetic_dataset(root / "raw", dataset_id=DATASET_ID, name="PredictBench")
        run(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2")
        for fold in ("0", "1"):
            run(env, "nnUNetv2_train", str(DATASET_ID), "3d_fullres", fold, "-tr", TRAINER, "-device", "cpu")
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
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for repeat in range(args.repeats):
        for name, command in commands.items():
            results[name].append(measure(env, command))
            seconds, peak = results[name][-1]
            print(f"repeat {repeat + 1}: {name}: {seconds:.1f} s, peak {peak / 2**20:.0f} MiB", flush=True)
    seconds = {name: statistics.median(s for s, _ in values) for name, values in results.items()}
    peaks = {name: statistics.median(p for _, p in values) for name, values in results.items()}
    baseline, ours = "nnUNetv2_predict", "nnunet-margin predict"
    print(f"\n{args.size}^3 image, 4 classes, folds 0 1, -npp {npp} -nps {nps}, {os.cpu_count()} CPU cores, "
          f"medians of {args.repeats}:")
    for name in commands:
        print(f"  {name:22s} {seconds[name]:7.1f} s   peak {peaks[name] / 2**20:6.0f} MiB")
    print(f"  ratio: time {seconds[ours] / seconds[baseline]:.3f}x (goal <= 1.10x), "
          f"peak memory {peaks[ours] / peaks[baseline]:.3f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()

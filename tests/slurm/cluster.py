"""The single-node Slurm test cluster of start.sh and stop.sh, for tests (import as `from slurm.cluster import ...`).

`start_clusters(folder, ...)` skips the calling test, naming the reason, where the cluster cannot start (no slurm-wlm or
munge package, not root, a daemon that refuses to run): CI installs the packages, other machines may not have them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytest

from nnunet_margin.nnunet.slurm import JobState, JobStatus, SlurmJob, job_states

HERE = Path(__file__).resolve().parent
DAEMONS = ("munged", "slurmctld", "slurmd")


def process_running(pid: int) -> bool:
    """Whether pid runs (a zombie has ended; it only waits for its parent to collect it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60, interval: float = 0.05) -> object:
    """Poll condition every `interval` seconds until it returns something true; fail naming `what` after timeout
    seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(interval)
    return result


def wait_until_ended(jobs: Sequence[SlurmJob], timeout: float = 60, interval: float = 0.05) -> dict[str, JobStatus]:
    """The jobs' states once none is pending or running (asking squeue every `interval` seconds: long jobs need no
    more than one question a second)."""
    waiting = (JobState.PENDING, JobState.RUNNING)

    def ended():
        states = job_states(jobs)
        return states if all(status.state not in waiting for status in states.values()) else None

    return wait_for(ended, f"jobs {[job.job_id for job in jobs]} to end", timeout, interval)


@dataclass
class TestCluster:
    folder: Path

    __test__ = False  # not a pytest test class

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def daemon_pids(self) -> dict[str, int]:
        """The daemons' pids from their pid files (the daemons remove them as they exit)."""
        files = {daemon: self.folder / f"{daemon}.pid" for daemon in DAEMONS}
        return {daemon: int(file.read_text()) for daemon, file in files.items() if file.exists()}

    def stop(self) -> subprocess.CompletedProcess:
        return subprocess.run([str(HERE / "stop.sh"), str(self.folder)], capture_output=True, text=True, timeout=60)

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (only while the controller remembers the job)."""
        result = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True,
                                check=True, env=self.environment())
        return dict(re.findall(r"(\S+?)=(\S*)", result.stdout))

    def forget_all_jobs(self) -> None:
        """Restart slurmctld without its saved state: it forgets every job, as it does MinJobAge (300 s by default)
        after a job ended. Job ids start again at 1."""
        pid = self.daemon_pids()["slurmctld"]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not process_running(pid), "slurmctld to stop", 30)
        subprocess.run(["slurmctld", "-c", "-i"], check=True, env=self.environment(), timeout=30)
        wait_for(lambda: subprocess.run(["squeue"], capture_output=True, env=self.environment()).returncode == 0,
                 "the restarted slurmctld to answer", 30)

    def environment(self) -> dict[str, str]:
        """This cluster's SLURM_CONF, and the daemons' folders on PATH."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{os.environ['PATH']}:/usr/sbin:/sbin"}


def start_clusters(*folders: Path) -> list[TestCluster]:
    """Start a cluster under each folder, all at once (about 3 s), or skip the test with the reason."""
    starts = [subprocess.Popen([str(HERE / "start.sh"), str(folder)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for folder in folders]
    errors = [start.communicate(timeout=60)[1].strip() for start in starts]
    clusters = [TestCluster(folder) for folder in folders]
    if any(start.returncode != 0 for start in starts):
        for cluster in clusters:
            cluster.stop()
        pytest.skip(" ".join(dict.fromkeys(error for error in errors if error)))  # start.sh names the reason
    return clusters

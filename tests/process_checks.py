"""Processes as the benchmark tests see them (Linux /proc): a process's descendants, whether one still runs, and
the processes whose environment holds a marker."""

from __future__ import annotations

from pathlib import Path


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(root: int) -> dict[int, int]:
    """{pid: depth below root} of root's descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {}, [(root, 0)]
    while frontier:
        pid, depth = frontier.pop()
        for child in children.get(pid, []):
            tree[child] = depth + 1
            frontier.append((child, depth + 1))
    return tree


def alive(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def processes_with(marker: bytes) -> list[int]:
    """Running processes whose environment contains `marker` (NAME=VALUE)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes() and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            pass
    return found

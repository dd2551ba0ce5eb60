"""A watchdog that takes an engine's processes down with the process that owns them.

vLLM's `AsyncLLM` runs its engine core in a child process (and, on CPU, a worker process
under that). The engine core does not watch its parent: when the process that owns the
engine dies without a clean shutdown (a Ray actor killed, a Serve replica replaced after a
failed health check, `pdserve serve` SIGKILLed by a benchmark's teardown), the engine core
and its worker are re-parented to init and keep running, holding their memory and, on CPU,
spinning on their cores. Seen here: two orphaned engines of a finished benchmark target
took ~65% of a core each during the next target's measurement.

`guard(pids)` starts one small process per engine that polls its parent (the engine's owner)
once a second; when the owner is gone it SIGKILLs the recorded processes. Each pid is
recorded with its start time, so a pid the kernel has since reused is never signalled. A
clean shutdown stops the watchdog first (`Reaper.stop`), so it never fires after one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

POLL_S = 1.0


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found.extend(kids)
        frontier.extend(kids)
    return found


@dataclass
class Reaper:
    process: subprocess.Popen | None

    def stop(self) -> None:
        """The owner is shutting the engine down cleanly: the watchdog must not fire."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def guard(pids: list[int]) -> Reaper:
    """Start a watchdog that SIGKILLs `pids` once this process has died. Linux only (it
    reads /proc); elsewhere it returns an inert Reaper."""
    stamped = [f"{pid}:{t}" for pid in pids if (t := _start_time(pid)) is not None]
    if not stamped or not os.path.isdir("/proc"):
        return Reaper(None)
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.reaper", str(os.getpid()), *stamped],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # not in the owner's process group: a group kill reaches
    return Reaper(process)        # the owner, and the watchdog outlives it to clean up


def _watch(owner: int, stamped: list[str]) -> None:
    while os.getppid() == owner:
        time.sleep(POLL_S)
    for item in stamped:
        pid, started = (int(x) for x in item.split(":"))
        if _start_time(pid) == started:  # still the process we recorded, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2:])

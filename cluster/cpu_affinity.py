"""Which cores the front end and each engine run on, on a CPU host.

Two rules, both needed because Linux processes inherit their parent's affinity:
- `pin_front_end` pins the process that starts a local Ray to `ray.front_end_cores` before
  `ray.init`, so Ray's processes (GCS, raylet, the Serve controller, the router and worker
  replicas) start, and stay, there.
- `spawn_on` starts an engine's processes on its cores: on those alone when the front end
  is pinned off them (the engine then has its cores to itself: its scheduler process, its
  OpenMP threads and its socket I/O), on the front end's cores as well when they overlap
  (or when the front end is not pinned, as in vLLM's own server, where only the OpenMP
  threads are bound by vLLM's CPU worker, among the cores its process may use).
- `renice` sets the niceness of a pool's engine processes (`cpu_nice`), every thread of
  them: a prefill engine that shares its core with the front end can be told to yield to it.

Without front-end cores both are no-ops: the front end may run anywhere, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator


def pin_front_end(cores: Iterable[int] | None) -> None:
    """This process (and what it starts from now on) on `cores`; nothing when None."""
    if cores is not None:
        os.sched_setaffinity(0, set(cores))


@contextlib.contextmanager
def spawn_on(cores: Iterable[int] | None) -> Iterator[None]:
    """Children started inside the block run on `cores`, or on `cores` and the calling
    thread's cores when the two overlap; the thread's cores are restored after. On Linux
    `sched_setaffinity(0, ...)` names the calling thread only, so the process's other
    threads keep theirs."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    own = set(cores)
    os.sched_setaffinity(0, own if not own & before else own | before)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def renice(pids: Iterable[int], nice: int | None) -> None:
    """Every thread of `pids` at niceness `nice` (threads they start later inherit it).
    Raising it needs no privilege; a process that is gone is skipped."""
    if nice is None:
        return
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except (ProcessLookupError, PermissionError):
                pass

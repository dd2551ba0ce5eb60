"""Which cores the front end and each engine run on, on a CPU host.

Two rules, both needed because Linux processes inherit their parent's affinity:
- `pin_front_end` pins the process that starts a local Ray to `ray.front_end_cores` before
  `ray.init`, so Ray's processes (GCS, raylet, the Serve controller, the router and worker
  replicas) start, and stay, there.
- `spawn_on` adds an engine's cores to the calling thread's while it spawns that engine's
  processes, so the engine may use them even when the front end is pinned elsewhere
  (vLLM's CPU worker binds its OpenMP threads among the cores its process may use; its
  model-runner process ends up on the engine's cores, while its scheduler process may also
  run on the front end's, as in vLLM's own server). Pinning the scheduler process to the
  engine's one core as well was measured and is worse: p50 TPOT 24-27 ms against 20-22 ms
  on the small model (bench/results/serving-vs-vllm-cpu-2core, runs -fe and -fe2): the
  scheduler then waits behind the model runner's busy-polling thread on that core.
- `renice` sets the niceness of a pool's engine processes (`cpu_nice`), every thread of
  them: a prefill engine that shares its core with the front end can be told to yield to it.

Without front-end cores both are no-ops: the front end may run anywhere, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)


def pin_front_end(cores: Iterable[int] | None, on_gpu: bool = False) -> None:
    """This process (and what it starts from now on) on `cores`; nothing when None. On a
    GPU host it is refused with a warning: GPU engines get no cores of their own
    (`cpu_cores` is for CPU engines), so they would inherit the front end's."""
    if cores is None:
        return
    if on_gpu:
        log.warning("ray.front_end_cores is for CPU hosts; ignored on this GPU host")
        return
    os.sched_setaffinity(0, set(cores))


@contextlib.contextmanager
def spawn_on(cores: Iterable[int] | None) -> Iterator[None]:
    """`cores` added to the calling thread's inside the block (children started there
    inherit the union), its previous cores restored after. On Linux
    `sched_setaffinity(0, ...)` names the calling thread only, so the process's other
    threads keep theirs."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, before | set(cores))
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

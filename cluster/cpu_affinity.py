"""Which cores the front end and each engine run on, on a CPU host.

Two rules, both needed because Linux processes inherit their parent's affinity:
- `pin_front_end` pins the process that starts a local Ray to `ray.front_end_cores` before
  `ray.init`, so Ray's processes (GCS, raylet, the Serve controller, the router and worker
  replicas) start, and stay, there.
- `spawn_on` adds an engine's cores to the calling thread's while it spawns that engine's
  processes, so the engine may use them even when the front end's cores exclude them
  (vLLM's CPU worker binds its OpenMP threads among the cores its process may use; its
  other threads, such as the engine core's socket I/O, keep the front end's cores too, as
  in vLLM's own server where only the OpenMP threads are bound).

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

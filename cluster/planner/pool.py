"""Pure jobs in a pool of forked processes, or in this one.

The planner's search hands out independent simulations (per-phase goodputs, bar checks,
evaluations, measurements). Each job is a pure function of its arguments, so the results,
and the plan, are the same however many processes run them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")


def num_workers(requested: int | None) -> int:
    """`requested`, else the cores this process may use; 1 where a pool would have to fork
    a process that runs other threads (a lock one of them holds would stay held in the
    child), or where the platform cannot fork."""
    n = requested
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n > 1 and (threading.active_count() > 1 or "fork" not in multiprocessing.get_all_start_methods()):
        if requested is not None:
            log.warning("planner: %d worker processes asked for, running in one: this process "
                        "runs other threads (or cannot fork)", requested)
        return 1
    return n


@contextmanager
def job_pool(requested: int | None) -> Iterator[Executor | None]:
    """A pool of `num_workers(requested)` forked processes, or None for one process."""
    workers = num_workers(requested)
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool


def map_jobs(pool: Executor | None, fn: Callable[[_T], _R], jobs: list[_T]) -> list[_R]:
    """`fn` over `jobs`, results in order, in the pool's processes when there is one."""
    if pool is None or len(jobs) < 2:
        return [fn(job) for job in jobs]
    return list(pool.map(fn, jobs))

"""Compiled hot loops for the planner's simulator.

`jit(fn)` is `numba.njit(cache=True)(fn)`, compiled on the first call rather than at import:
only a process that simulates loads numba (and its LLVM bindings). That matters because
vLLM's CPU worker, when it starts, scans every loaded module's attributes
(`vllm/triton_utils/dispatcher.py`, `_rebind_kernels`) and fails on llvmlite's FFI wrapper
(`llvmlite.binding.ffi.lib`, whose `__getattr__` answers even for `__dict__`). The profiler
runs its engine in its own process and imports planner modules without simulating, so it must
not load numba. A process that has simulated can still start engines through `AsyncLLM`: vLLM
starts their processes by spawn, and they do not inherit it (checked with the tiny model).

The first call in a fresh checkout compiles (about 15 s for the decode loop) and writes the
machine code next to the module (`__pycache__`); later processes load it in well under a
second. `NUMBA_DISABLE_JIT=1` runs the same functions as plain Python (for debugging).

Each kernel keeps its helpers as closures in its own body, which is why the prefill and
colocated kernels each write out the same few lines of queue routing (least outstanding
tokens, then a linked-list append). A helper shared across modules would have to be
registered with numba before any kernel compiles (numba at import, which the paragraph above
rules out), and numba's cache checks only the kernel's own file: an edit to a helper
elsewhere would leave stale machine code in use.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    compiled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            from numba import njit

            compiled = njit(cache=True)(fn)
        return compiled(*args)

    return call

"""A real vLLM engine's processes die with the process that owns it (cluster/reaper.py).

Before the reaper, SIGKILLing the owner of an `EngineHost` (a Ray actor, a Serve replica,
`pdserve serve` under a benchmark's teardown) left vLLM's engine core and its CPU worker
running as orphans of init, each spinning on a core."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster import reaper

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")]

ROOT = Path(__file__).resolve().parents[2]

OWNER = textwrap.dedent("""
    import asyncio, os, sys, time
    from cluster.config import ModelConfig, PoolConfig
    from cluster.engine_host import EngineHost, EngineSpec
    from cluster.tiny_model import ensure_tiny_model

    host = EngineHost(EngineSpec(
        model_path=ensure_tiny_model("tiny"), model=ModelConfig(max_model_len=512),
        pool=PoolConfig(num_instances=1, kv_cache_gib=1, max_num_seqs=8), instance_index=0))
    asyncio.run(host.start())
    print("ready", flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_engine_processes_die_when_the_owner_is_sigkilled():
    pytest.importorskip("vllm")
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    engine_pids: list[int] = []
    try:
        for line in owner.stdout:  # vLLM logs to stdout too
            if line.strip() == "ready":
                break
        else:
            pytest.fail("the engine did not start")
        engine_pids = [p for p in reaper.descendants(owner.pid) if _alive(p)]
        names = {open(f"/proc/{p}/comm").read().strip() for p in engine_pids}
        assert any(n.startswith("VLLM") for n in names), names  # the engine core is a child
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in engine_pids):
            time.sleep(0.2)
        left = [p for p in engine_pids if _alive(p)]
        assert not left, f"engine processes outlived their owner: {left}"
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in engine_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

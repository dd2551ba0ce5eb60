"""Front-end and engine cores on a CPU host (cluster/cpu_affinity.py, ray.front_end_cores)."""

import os
import subprocess
import sys
import time

import pytest

from cluster.config import ConfigError, load_config
from cluster.cpu_affinity import pin_front_end, renice, spawn_on
from pdserve.serving import worker_niceness_env

HOST = sorted(os.sched_getaffinity(0))
two_cores = pytest.mark.skipif(len(HOST) < 2, reason="needs two cores")


def _child_cores() -> set[int]:
    out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(eval(out))


@two_cores
def test_a_pinned_front_end_spawns_its_children_on_its_cores_and_an_engine_adds_its_own():
    front, engine = HOST[0], HOST[1]
    code = f"""
import os, subprocess, sys
from cluster.cpu_affinity import pin_front_end, renice, spawn_on
pin_front_end([{front}])
def child():
    return subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                          capture_output=True, text=True, check=True).stdout.strip()
print(child())
with spawn_on([{engine}]):
    print(child())
with spawn_on([{front}, {engine}]):
    print(child())
print(child(), sorted(os.sched_getaffinity(0)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.splitlines()
    assert out[0] == f"[{front}]"                      # Ray's processes: the front end's core
    assert out[1] == str(sorted({front, engine}))      # an engine: its own core as well
    assert out[2] == str(sorted({front, engine}))
    assert out[3] == f"[{front}] [{front}]"            # restored for what starts after


def test_without_front_end_cores_nothing_changes():
    before = os.sched_getaffinity(0)
    pin_front_end(None)
    with spawn_on(None):
        assert _child_cores() == before
    assert os.sched_getaffinity(0) == before


def test_front_end_cores_are_validated():
    with pytest.raises(ConfigError, match="front_end_cores"):
        load_config(overrides={"ray": {"front_end_cores": []}})
    with pytest.raises(ConfigError, match="front_end_cores"):
        load_config(overrides={"ray": {"front_end_cores": [-1]}})


def test_an_engine_with_a_core_free_of_the_front_end_runs_at_nice_0(monkeypatch):
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.setattr("pdserve.serving.is_cuda_available", lambda: False)
    pinned = {"prefill": {"cpu_cores": [[0]]}, "decode": {"cpu_cores": [[1]]}}
    shared = load_config(overrides=pinned)
    assert worker_niceness_env(shared, [0, 1]) == {}  # engines and front end share both cores
    fenced = load_config(overrides={**pinned, "ray": {"front_end_cores": [0]}})
    assert worker_niceness_env(fenced, [0, 1]) == {"RAY_worker_niceness": "0"}


def test_renice_sets_every_thread_of_the_engine_processes():
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        renice([child.pid, 2**22 + 7], 7)  # a pid that does not exist is skipped
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) >= 2
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in tids} == {7}
    finally:
        child.kill()
        child.wait()


def test_front_end_cores_are_refused_with_an_existing_ray_cluster():
    with pytest.raises(ConfigError, match="front_end_cores pins the Ray that pdserve starts"):
        load_config(overrides={"ray": {"front_end_cores": [0], "address": "10.0.0.1:6379"}})


def test_front_end_cores_are_refused_on_a_gpu_host_with_a_warning(caplog):
    before = os.sched_getaffinity(0)
    with caplog.at_level("WARNING"):
        pin_front_end([HOST[0]], on_gpu=True)
    assert os.sched_getaffinity(0) == before
    assert "ignored on this GPU host" in caplog.text

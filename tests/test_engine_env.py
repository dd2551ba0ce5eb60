"""Engine settings reach the engine's processes through a scoped environment, never the
caller's: cluster.engine_host.engine_env."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from cluster.engine_host import engine_env

KEY = "PDSERVE_TEST_ENGINE_ENV"


def test_values_are_seen_by_processes_started_inside_and_restored_after(monkeypatch):
    monkeypatch.setenv(KEY, "caller")
    with engine_env({KEY: "engine-a", KEY + "_NEW": "1"}):
        seen = subprocess.run([sys.executable, "-c", f"import os; print(os.environ['{KEY}'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert seen == "engine-a"
    assert os.environ[KEY] == "caller" and KEY + "_NEW" not in os.environ


def test_concurrent_engine_starts_each_see_their_own_settings():
    seen: dict[str, str] = {}

    def start(name: str) -> None:
        with engine_env({KEY: name}):
            seen[name] = subprocess.run(
                [sys.executable, "-c", f"import os; print(os.environ['{KEY}'])"],
                capture_output=True, text=True, check=True).stdout.strip()

    threads = [threading.Thread(target=start, args=(f"engine-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {f"engine-{i}": f"engine-{i}" for i in range(4)}
    assert KEY not in os.environ

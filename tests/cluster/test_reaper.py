"""cluster/reaper.py: an engine's processes die with their owner, and only then."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster import reaper

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")

# The owner: starts a long-lived child (standing in for vLLM's engine core), guards it, prints
# the child's pid, then waits to be killed (or, with "clean", stops the watchdog first).
OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from cluster import reaper
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    guard = reaper.guard([child.pid])
    if sys.argv[1] == "clean":
        guard.stop()
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _owner(mode: str) -> tuple[subprocess.Popen, int]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, mode], stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    child = int(owner.stdout.readline())
    return owner, child


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_guarded_process_dies_when_its_owner_is_killed():
    owner, child = _owner("guard")
    try:
        assert _alive(child)
        owner.kill()  # no clean shutdown: exactly what leaves an orphaned engine core
        owner.wait()
        assert _wait_gone(child, 5 * reaper.POLL_S), "the child outlived its owner"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_clean_shutdown_disarms_the_watchdog():
    owner, child = _owner("clean")
    try:
        owner.kill()
        owner.wait()
        time.sleep(3 * reaper.POLL_S)
        assert _alive(child), "the watchdog fired after the owner had stopped it"
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_reused_pid_is_never_signalled():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wrong_start = reaper._start_time(victim.pid) - 1  # as if the pid now named another process
        gone_owner = -1  # never our parent: the watchdog acts at once
        reaper._watch(gone_owner, [f"{victim.pid}:{wrong_start}"])
        assert _alive(victim.pid)
    finally:
        victim.kill()
        victim.wait()


def test_descendants_sees_grandchildren():
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(c.pid, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(parent.stdout.readline())
        found = reaper.descendants(os.getpid())
        assert parent.pid in found and grandchild in found
    finally:
        os.kill(grandchild, signal.SIGKILL)
        parent.kill()
        parent.wait()

"""Starting and stopping deployments as process groups (with stand-in serve commands)."""

import os
import sys
import time

import httpx
import pytest

from bench.deployment import ServerProcess, ServerState, free_port, parse_serve_command
from bench.errors import BenchError


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("mode: colocated\ncolocated: {num_instances: 2}\n")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; it is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_fake_deployment_starts_answers_and_stops(config, tmp_path):
    port = free_port()
    server = ServerProcess(config, port, tmp_path / "server.log",
                           serve_command=[sys.executable, "-m", "bench.fake_server"],
                           health_timeout_s=30)
    with server:
        assert server.state is ServerState.READY
        assert server.argv[-5:] == ["serve", "--config", str(config), "--port", str(port)]
        assert httpx.get(server.base_url + "/health", trust_env=False).status_code == 200
        pid = server._process.pid
    assert server.state is ServerState.STOPPED
    assert not _alive(pid)
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.base_url + "/health", trust_env=False, timeout=1)


def test_stop_kills_the_whole_process_group(config, tmp_path):
    # The "server" starts a child and never gets healthy: stopping it must end both.
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen(['sleep', '60']); "
              "open(sys.argv[3] + '.child', 'w').write(str(child.pid)); time.sleep(60)")
    server = ServerProcess(config, free_port(), tmp_path / "server.log",
                           serve_command=[sys.executable, "-c", script], health_timeout_s=1.5,
                           stop_grace_s=5)
    with pytest.raises(BenchError, match="was not healthy .* within 1.5 s"):
        with server:
            pass
    child_pid = int((tmp_path / "deploy.yaml.child").read_text())
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)
    assert server.state is ServerState.STOPPED


def test_early_exit_reports_status_and_log_tail(config, tmp_path):
    script = "import sys; print('model not found: /nowhere'); sys.exit(3)"
    server = ServerProcess(config, free_port(), tmp_path / "server.log",
                           serve_command=[sys.executable, "-c", script], health_timeout_s=30)
    with pytest.raises(BenchError, match=r"(?s)exited with status 3 .*model not found"):
        with server:
            pass


def test_missing_command_and_config(config, tmp_path):
    with pytest.raises(BenchError, match="cannot start"):
        with ServerProcess(config, free_port(), tmp_path / "s.log",
                           serve_command=["/nonexistent/pdserve"]):
            pass
    with pytest.raises(BenchError, match="deployment config not found"):
        ServerProcess(tmp_path / "missing.yaml", 1, tmp_path / "s.log")
    assert parse_serve_command("python -m x --flag 'a b'") == ["python", "-m", "x", "--flag", "a b"]

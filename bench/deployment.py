"""Start a deployment (`pdserve serve --config FILE --port P`, or any server command such
as plain vLLM's, see `bench.peer_vllm`) for a benchmark, and stop it.

Lifecycle of a `ServerProcess`:

    CREATED ──start()──▶ STARTING ──/health 200──▶ READY ──stop()──▶ STOPPED
                            │                                          ▲
                            ├──process exited──▶ FAILED ──stop()───────┤
                            └──health timeout──▶ FAILED ──stop()───────┘

The server runs in its own session (process group), with stdout and stderr going to a
log file; `stop()` sends SIGTERM to the whole group, waits `stop_grace_s`, then
SIGKILLs the group, so engine and Ray child processes go too. Use it as a context
manager: the group is stopped however the benchmark ends.
"""

from __future__ import annotations

import enum
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from bench.errors import BenchError

_LOG_TAIL_LINES = 15


class ServerState(str, enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


def default_serve_command() -> list[str]:
    """`pdserve` from the running interpreter's environment, else from PATH."""
    beside = Path(sys.executable).with_name("pdserve")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("pdserve")
    if found:
        return [found]
    return [sys.executable, "-m", "pdserve.cli"]


def parse_serve_command(text: str | None) -> list[str]:
    if not text:
        return default_serve_command()
    argv = shlex.split(text)
    if not argv:
        raise BenchError("--serve-command is empty")
    return argv


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    tail = [line for line in lines if line.strip()][-_LOG_TAIL_LINES:]
    return "\n".join("    " + line for line in tail)


class ServerProcess:
    def __init__(
        self,
        config_path: Path | None,
        port: int,
        log_path: Path,
        serve_command: list[str] | None = None,
        host: str = "127.0.0.1",
        health_timeout_s: float = 600.0,
        stop_grace_s: float = 15.0,
        *,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        cpus: list[int] | None = None,
    ) -> None:
        """`pdserve serve --config config_path --port port`, or with `argv` that exact
        command (which must listen on `port`); `env` replaces the environment and `cpus`
        limits the whole process tree to those cores."""
        if argv is not None:
            self.argv = list(argv)
        else:
            if config_path is None or not Path(config_path).is_file():
                raise BenchError(f"deployment config not found: {config_path}")
            self.argv = [*(serve_command or default_serve_command()), "serve",
                         "--config", str(config_path), "--port", str(port)]
        self.env = env
        self.cpus = list(cpus) if cpus else None
        self.base_url = f"http://{host}:{port}"
        self.log_path = log_path
        self.health_timeout_s = health_timeout_s
        self.stop_grace_s = stop_grace_s
        self.state = ServerState.CREATED
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> "ServerProcess":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        try:
            cpus = self.cpus
            self._process = subprocess.Popen(
                self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env=self.env,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        except OSError as e:
            self.state = ServerState.FAILED
            raise BenchError(f"cannot start `{shlex.join(self.argv)}`: {e.strerror or e}") from None
        self.state = ServerState.STARTING

    def wait_ready(self, poll_interval_s: float = 0.5) -> None:
        """Block until GET /health answers 200; BenchError on exit or timeout."""
        assert self._process is not None, "start() first"
        deadline = time.monotonic() + self.health_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                code = self._process.poll()
                if code is not None:
                    self.state = ServerState.FAILED
                    raise BenchError(
                        f"`{shlex.join(self.argv)}` exited with status {code} before it was "
                        f"ready; log {self.log_path}:\n{_log_tail(self.log_path)}"
                    )
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        self.state = ServerState.READY
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    self.state = ServerState.FAILED
                    raise BenchError(
                        f"`{shlex.join(self.argv)}` was not healthy at {self.base_url}/health "
                        f"within {self.health_timeout_s:g} s; log {self.log_path}"
                    )
                time.sleep(poll_interval_s)

    def stop(self) -> None:
        """Terminate the whole process group (idempotent)."""
        process = self._process
        if process is not None and process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                pass
        # SIGKILL stragglers even when the leader exited: its children share the group.
        if process is not None:
            self._signal_group(signal.SIGKILL)
            try:
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._process = None  # never signal a group id that may since have been reused
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.state is not ServerState.CREATED:
            self.state = ServerState.STOPPED

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._process is not None
        try:
            # start_new_session=True made the server the leader of group == its pid.
            os.killpg(self._process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

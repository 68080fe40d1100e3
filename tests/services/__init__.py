"""Real services for the tests, each a separate local process: a Kafka broker and a Spark Connect server.

The launchers (``kafka.KafkaBroker``, ``connect.ConnectServer``) are context managers; what they share is here:
free ports, waiting for a port, the tail of a log, stopping a process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class ServiceError(RuntimeError):
    """A service that did not start (or a command against it that failed), with the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it; another process could still take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen, timeout: float, what: str, log: Path, poll: float = 0.25
) -> None:
    """Poll ``ready`` until it holds; fail early if the process died, and after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServiceError(f"{what} exited with code {process.returncode} while starting; {log}:\n{tail(log)}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise ServiceError(f"{what} was not ready after {timeout:.0f} s; {log}:\n{tail(log)}")
        time.sleep(poll)


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process's own group (it was started in a new session), then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    # The group, not just the pid: spark-submit's shell wrapper and the JVM it starts both go.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

"""Helpers for tests that start ROS: isolated domains on loopback, nodes in subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

_COUNTER = [0]


def ros_env(tmp_path: Path) -> dict[str, str]:
    """An environment for one test: its own ROS_DOMAIN_ID, localhost-only discovery, logs in tmp."""
    _COUNTER[0] += 1
    domain = 1 + (os.getpid() * 7 + _COUNTER[0] * 13) % 100  # 1..100: clear of common defaults
    env = dict(os.environ)
    env.update(
        ROS_DOMAIN_ID=str(domain),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_LOCALHOST_ONLY="1",  # Humble's spelling of the same
        ROS_LOG_DIR=str(tmp_path / "ros_log"),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def ros_domain(tmp_path, monkeypatch):
    """Put this test process itself on an isolated domain (for in-test rclpy clients)."""
    env = ros_env(tmp_path)
    for key in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY", "ROS_LOG_DIR"):
        monkeypatch.setenv(key, env[key])
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``python <args>`` (e.g. ``["-m", "xvr_ros.ros.bringup", ...]``) with output to ``log``."""
    out = open(log, "w")  # noqa: SIM115 - closed in stop()
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc._log_file = out  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGINT, then SIGTERM, then SIGKILL (an executor blocked in wait can miss the first SIGINT)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
    proc._log_file.close()  # type: ignore[attr-defined]
    return proc.returncode


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")

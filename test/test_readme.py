r"""README's commands run as written, from the repository root, in a fresh shell.

What runs: every command in the ``bash`` blocks of the README's opening (the quick start) and of
"The ROS 2 system", one per line (``\\`` continuations joined, comments dropped), each with
``bash -c`` from the repository root in an environment where the venv and the colcon install
are not yet active (``source tools/env.sh`` in the command is what activates them, as for a
user who just opened a terminal). A command that fails, or does not come up, fails the test.

Not run, by the rules in :data:`NOT_RUN` (the test says which lines it skipped and why):

* ``make ...`` (``make demo``, ``make test``): the whole set-up plus the demo (minutes of CPU)
  or this very test suite (recursive); what they run is tested by the rest of the suite.
* ``ros2 ...``: needs a real ROS 2 install (there is no ``ros2`` command here).

Long-running commands (``bringup``) are started, checked to come up (their log says all three
nodes run, and each node's status arrives on ``/diagnostics``) and stopped with SIGINT, which
must end them with exit code 0. Every ``xvr-ros`` subcommand listed in "Command line" must
answer ``--help``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import rclpy
from conftest import start, stop, stop_spinning, wait_for
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICK_START = ""  # the text before the first "## " heading
ROS_SYSTEM = "The ROS 2 system"
COMMAND_LINE = "Command line (no ROS needed)"
#: Command prefix -> why such a line is not run here.
NOT_RUN = {
    "make ": "runs the whole set-up and the demo or this test suite itself",
    "ros2 ": "needs a real ROS 2 install",
}
#: Commands that run until stopped, and the log line that says they are up.
LONG_RUNNING = {"bringup": "bringup: running /model_manager, /pose_estimator, /refiner in one process"}
NODES = {"/model_manager", "/pose_estimator", "/refiner"}
#: Search paths that tools/env.sh extends (with the venv and the colcon install).
PATH_LISTS = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "COLCON_PREFIX_PATH")
RUN_TIMEOUT = 300.0
START_TIMEOUT = 120.0  # the nodes import torch and load nothing else; slow only on busy cores


def readme_sections() -> dict[str, str]:
    """README's text by ``## `` heading; the opening (quick start) under ``""``."""
    sections, name = {QUICK_START: []}, QUICK_START
    for line in README.read_text().splitlines():
        if line.startswith("## "):
            name = line[3:].strip()
            sections[name] = []
        else:
            sections[name].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def commands(section: str) -> list[str]:
    """The commands of a section's ``bash`` blocks: continuations joined, comments dropped."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"(^|\s+)#.*$", "", line).strip()
            if command:
                out.append(command)
    return out


def split_runnable(lines: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """-> (commands to run, [(command, why not)])."""
    run, skipped = [], []
    for command in lines:
        why = next((reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)), None)
        if why:
            skipped.append((command, why))
        else:
            run.append(command)
    return run, skipped


SECTIONS = readme_sections()
RUNNABLE, SKIPPED = split_runnable(commands(SECTIONS[QUICK_START]) + commands(SECTIONS[ROS_SYSTEM]))
SUBCOMMANDS = sorted({c.split()[1] for c in commands(SECTIONS[COMMAND_LINE]) if c.startswith("xvr-ros ")})


def fresh_shell_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the venv and the colcon install: what a new terminal has before ``source tools/env.sh``."""
    # The ROS wheels' bootstrapper re-executes Python with its LD_LIBRARY_PATH once; its guard goes too.
    env = {k: v for k, v in env.items() if not k.startswith(("VIRTUAL_ENV", "_ROS_WHEELS_BOOTSTRAP"))}
    for key in PATH_LISTS:
        kept = [p for p in env.get(key, "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(REPO)]
        if kept:
            env[key] = os.pathsep.join(kept)
        else:
            env.pop(key, None)
    return env


def bash(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``bash -c command`` from the repository root in its own process group, output to ``log``."""
    return start(["bash", "-c", command], env, log, cwd=REPO, python=False)


# --------------------------------------------------------------------------------------------
def test_readme_has_commands_to_run():
    """The parsing found the sections and their commands (an empty list would make the rest vacuous)."""
    assert any("bringup" in c for c in RUNNABLE), RUNNABLE
    assert {c.split()[0] for c, _ in SKIPPED} == {"make", "ros2"}, SKIPPED
    assert {"train", "register", "replay", "bringup"} <= set(SUBCOMMANDS), SUBCOMMANDS


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, ros_domain, tmp_path):
    env = fresh_shell_env(dict(os.environ))  # ros_domain put this process on an isolated domain
    log = tmp_path / "command.log"
    up = next((line for key, line in LONG_RUNNING.items() if key in command), None)
    if up is None:
        run_to_completion(command, env, log)
    else:
        start_and_stop(command, env, log, up)


def run_to_completion(command: str, env: dict[str, str], log: Path) -> None:
    proc = bash(command, env, log)
    try:
        code = proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None  # still running
    stop(proc)
    assert code == 0, f"{command!r} ended with {code} (None: still running after {RUN_TIMEOUT} s):\n{log.read_text()}"


def start_and_stop(command: str, env: dict[str, str], log: Path, up: str) -> None:
    """Start ``command``, wait for ``up`` in its log and every node's status on /diagnostics, SIGINT it."""
    seen: set[str] = set()
    context = rclpy.Context()
    rclpy.init(context=context)
    probe = rclpy.create_node("readme_probe", context=context)
    probe.create_subscription(DiagnosticArray, "/diagnostics", lambda m: seen.update(s.name for s in m.status), 50)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe)
    spinning = threading.Thread(target=executor.spin, daemon=True)
    spinning.start()
    proc = bash(command, env, log)
    try:
        try:
            wait_for(
                lambda: proc.poll() is not None or (up in log.read_text() and NODES <= seen),
                START_TIMEOUT,
                what=f"{command!r} to come up (log line {up!r}, /diagnostics from {sorted(NODES)})",
            )
            assert proc.poll() is None, f"{command!r} exited with {proc.returncode}:\n{log.read_text()}"
        finally:
            stop_spinning(executor, spinning, probe, context)  # before the nodes leave
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"{command!r}: no clean exit on SIGINT ({code}):\n{log.read_text()}"
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_command_line_help(subcommand, tmp_path):
    result = subprocess.run(
        ["bash", "-c", f"source tools/env.sh && xvr-ros {subcommand} --help"],
        cwd=REPO,
        env=fresh_shell_env(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"usage: xvr-ros {subcommand}"), result.stdout

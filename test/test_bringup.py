"""The system definition (xvr_ros.ros.bringup), config/intraop.yaml and launch/intraop.launch.py.

Checks that the parameters file resolves per node as rcl resolves a ``--params-file`` (namespaces
and wildcards included), that every parameter in it is one the nodes declare (with the right
type), that the launch file builds one ``launch_ros`` Node per spec from the same definition
(with stand-ins for ``launch``/``launch_ros``, which are not installed here), and that the
in-process bringup runs all nodes in one process and exits cleanly on SIGINT and SIGTERM.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import rclpy
import yaml
from conftest import start, stop, wait_for
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from xvr_ros.ros import bringup
from xvr_ros.ros.bringup import (
    NODES,
    ConfigError,
    load_config,
    node_parameters,
    plan,
    select,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "intraop.yaml"
LAUNCH = REPO / "launch" / "intraop.launch.py"
NAMES = [s.name for s in NODES]


@pytest.fixture
def config(tmp_path) -> Path:
    """config/intraop.yaml with the models directory in the test's temp dir."""
    data = yaml.safe_load(CONFIG.read_text())
    data["/**/model_manager"]["ros__parameters"]["models_dir"] = str(tmp_path / "models")
    path = tmp_path / "intraop.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def context(ros_domain):
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def test_specs():
    assert NAMES == ["model_manager", "pose_estimator", "refiner"]
    for spec in NODES:
        cls = spec.load()
        assert issubclass(cls, Node)
        assert callable(getattr(__import__(spec.module, fromlist=["main"]), "main"))
        script = REPO / "scripts" / spec.executable  # what `ros2 run` / launch start
        assert script.is_file() and os.access(script, os.X_OK)
        assert f"from {spec.module} import main" in script.read_text()
    assert [s.name for s in select("refiner, model_manager")] == ["model_manager", "refiner"]
    with pytest.raises(ConfigError, match="unknown node"):
        select("model_manager,planner")


def test_yaml_parameters_per_node():
    shared = load_config(CONFIG)["/**"]["ros__parameters"]
    for ns in ("", "or2", "/site/or2"):
        params = {name: node_parameters(CONFIG, name, ns) for name in NAMES}
        for name in NAMES:
            for key, value in shared.items():  # the shared section reaches every node
                assert params[name][key] == value
        assert params["model_manager"]["models_dir"] == "~/.ros/xvr_ros/models"
        assert "models_dir" not in params["refiner"] and "time_budget" not in params["model_manager"]
        assert params["refiner"]["time_budget"] == 10.0 and params["pose_estimator"]["camera_info_timeout"] == 1.0
    assert node_parameters(CONFIG, "refiner", device="cuda:1")["device"] == "cuda:1"
    assert node_parameters(CONFIG, "refiner", overrides={"time_budget": 2.0})["time_budget"] == 2.0


def test_rcl_matching_rules(tmp_path):
    cfg = {
        "/**": {"ros__parameters": {"a": 1, "b": 1, "nested": {"x": 1.5}}},
        "model_manager": {"ros__parameters": {"a": 2}},  # root namespace only (as in rcl)
        "/or2/*": {"ros__parameters": {"b": 3}},  # any node directly in /or2
        "/**/refiner": {"ros__parameters": {"a": 4}},
    }
    assert node_parameters(cfg, "model_manager") == {"a": 2, "b": 1, "nested.x": 1.5}
    assert node_parameters(cfg, "model_manager", "or2") == {"a": 1, "b": 3, "nested.x": 1.5}
    assert node_parameters(cfg, "refiner", "or2") == {"a": 4, "b": 3, "nested.x": 1.5}
    assert node_parameters(cfg, "refiner", "or2/x") == {"a": 4, "b": 1, "nested.x": 1.5}
    entries = plan(cfg, namespace="or2", device="cpu", only="refiner", overrides={"refiner": {"b": 9}})
    assert [(s.name, p) for s, p in entries] == [("refiner", {"a": 4, "b": 9, "nested.x": 1.5, "device": "cpu"})]
    with pytest.raises(ConfigError, match="ros__parameters"):
        load_config({"n": {"params": {}}})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("/**: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_same_parameters_as_rcl_params_file(context):
    """What rcl gives a node from ``--params-file`` equals node_parameters(), in any namespace."""
    for ns in ("", "or2/x"):
        for name in NAMES:
            node = Node(
                name,
                namespace=ns or None,
                context=context,
                cli_args=["--ros-args", "--params-file", str(CONFIG)],
                automatically_declare_parameters_from_overrides=True,
            )
            try:
                got = {k: p.value for k, p in node.get_parameters_by_prefix("").items()}
            finally:
                node.destroy_node()
            got = {
                k: (list(v) if hasattr(v, "tolist") else v)
                for k, v in got.items()
                if k not in ("use_sim_time", "start_type_description_service")
            }
            assert got == node_parameters(CONFIG, name, ns), (ns, name)


def test_nodes_declare_every_parameter_of_the_yaml(config, context):
    """make_nodes/running create each node with its YAML parameters; every YAML key is declared
    by its node (no typos, right types), and every shared key by some node."""
    data = load_config(config)
    used_shared = set()
    with bringup.running(config, namespace="or2", device="cpu", context=context) as nodes:
        assert [n.get_fully_qualified_name() for n in nodes] == [f"/or2/{n}" for n in NAMES]
        for node, spec in zip(nodes, NODES):
            expected = node_parameters(config, spec.name, "or2", device="cpu")
            section = data[f"/**/{spec.name}"]["ros__parameters"]
            for key, value in expected.items():
                if node.has_parameter(key):
                    actual = node.get_parameter(key).value
                    assert (list(actual) if hasattr(actual, "tolist") else actual) == value, (spec.name, key)
                    used_shared.add(key)
                else:
                    assert key not in section, f"{spec.name} does not declare {key!r} of its YAML section"
        assert (models := Path(nodes[0].get_parameter("models_dir").value)).is_dir() and models.parent == config.parent
    unused = set(data["/**"]["ros__parameters"]) - used_shared
    assert not unused, f"shared parameters no node declares: {unused}"


# --------------------------------------------------------------------------------------------
# The launch file, with stand-ins for launch / launch_ros
# --------------------------------------------------------------------------------------------
class _Action:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context.launch_configurations[self.name]


def _stub_launch(monkeypatch):
    classes = {
        "launch": {"LaunchDescription": type("LaunchDescription", (_Action,), {})},
        "launch.actions": {n: type(n, (_Action,), {}) for n in ("DeclareLaunchArgument", "OpaqueFunction")},
        "launch.substitutions": {"LaunchConfiguration": _LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {"Node": type("Node", (_Action,), {})},
    }
    for name, attrs in classes.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


def _load_launch_file():
    spec = importlib.util.spec_from_file_location("intraop_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_file_imports_without_launch():
    module = _load_launch_file()  # launch/launch_ros are imported lazily: no error here
    assert callable(module.generate_launch_description)


def test_launch_file_builds_the_same_nodes(monkeypatch, config):
    _stub_launch(monkeypatch)
    description = _load_launch_file().generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    assert set(declared) == {"config", "namespace", "device", "only"}
    assert declared["config"].endswith("config/intraop.yaml") and Path(declared["config"]).is_file()
    (opaque,) = [e for e in entities if type(e).__name__ == "OpaqueFunction"]

    def launch(**arguments):
        context = types.SimpleNamespace(
            launch_configurations={"config": "", "namespace": "", "device": "", "only": ""} | arguments
        )
        return opaque.kwargs["function"](context)

    nodes = launch(config=str(config), namespace="or2", device="cuda")
    assert len(nodes) == len(NODES)
    for node, spec in zip(nodes, NODES):
        kw = node.kwargs
        assert (kw["package"], kw["executable"], kw["name"], kw["namespace"]) == (
            "xvr_ros",
            spec.executable,
            spec.name,
            "or2",
        )
        assert kw["parameters"] == [node_parameters(config, spec.name, "or2", device="cuda")]
        assert kw["parameters"][0]["device"] == "cuda"
    # Defaults: the installed/source config, root namespace, the config's device; and a subset.
    nodes = launch(only="model_manager,refiner")
    assert [n.kwargs["name"] for n in nodes] == ["model_manager", "refiner"]
    assert nodes[0].kwargs["namespace"] == "" and nodes[0].kwargs["parameters"][0]["device"] == "cpu"
    assert nodes[0].kwargs["parameters"] == [node_parameters(bringup.default_config_path(), "model_manager")]


# --------------------------------------------------------------------------------------------
# In-process bringup: one process, clean shutdown
# --------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _node_names(node) -> set[tuple[str, str]]:
    return set(node.get_node_names_and_namespaces())


def test_bringup_runs_all_nodes_in_one_process(config, tmp_path, context):
    env = dict(os.environ)  # ros_domain (via context) put this process on an isolated domain
    log = tmp_path / "bringup.log"
    proc = start(
        ["-m", "xvr_ros.ros.bringup", "--config", str(config), "--namespace", "or2", "--device", "cpu"], env, log
    )
    probe = Node("bringup_probe", context=context)
    try:
        expected = {(name, "/or2") for name in NAMES}
        wait_for(lambda: proc.poll() is not None or expected <= _node_names(probe), 60, what=f"nodes {expected}")
        assert proc.poll() is None, f"bringup exited ({proc.returncode}):\n{log.read_text()}"
        # The graph can show the nodes a moment before the line is logged.
        up = "running /or2/model_manager, /or2/pose_estimator, /or2/refiner in one process"
        wait_for(lambda: up in log.read_text(), 15, what="the bringup line")
        # The refiner's start-up loads the kernels, and torch then runs the compiler (a child process)
        # to check its version: wait for that to end, or a SIGINT to the group (as a terminal's Ctrl-C)
        # reaches the compiler and torch logs the failure with a traceback.
        wait_for(lambda: "render kernels:" in log.read_text(), 60, what="the refiner's kernel status")
        assert _children(proc.pid) == []  # all nodes in this one process
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"no clean exit on SIGINT ({code}):\n{log.read_text()}"
        wait_for(lambda: not (expected & _node_names(probe)), 15, what="nodes to leave the graph")
    finally:
        stop(proc)
        probe.destroy_node()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_bringup_only_and_sigterm(config, tmp_path, context):
    log = tmp_path / "bringup.log"
    proc = start(
        ["-m", "xvr_ros.ros.bringup", "--config", str(config), "--only", "model_manager"], dict(os.environ), log
    )
    probe = Node("bringup_probe", context=context)
    try:
        try:
            wait_for(lambda: proc.poll() is not None or ("model_manager", "/") in _node_names(probe), 60,
                     what="model_manager")
            assert proc.poll() is None, f"bringup exited ({proc.returncode}):\n{log.read_text()}"
            assert not {("pose_estimator", "/"), ("refiner", "/")} & _node_names(probe)
        finally:
            probe.destroy_node()  # before the node leaves (conftest.stop_spinning says why)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"no clean exit on SIGTERM ({code}):\n{log.read_text()}"
    finally:
        stop(proc)


def test_bringup_bad_arguments(tmp_path, capsys):
    assert bringup.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the parameters file" in capsys.readouterr().err
    assert bringup.main(["--config", str(CONFIG), "--only", "planner"]) == 2
    assert "unknown node" in capsys.readouterr().err


def test_spin_nodes_stops_on_event(config, context):
    nodes = bringup.make_nodes(config, only="model_manager", namespace="spin", context=context)
    stop_event, returned = threading.Event(), []
    thread = threading.Thread(
        target=lambda: returned.append(bringup.spin_nodes(nodes, stop=stop_event, context=context))
    )
    thread.start()
    probe = Node("spin_probe", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe)
    try:
        wait_for(lambda: ("model_manager", "/spin") in _node_names(probe), 20, what="model_manager")
        stop_event.set()
        thread.join(15)
        assert not thread.is_alive() and returned == [True]
    finally:
        executor.shutdown()
        probe.destroy_node()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the exception it is about
def test_spin_nodes_says_when_the_executor_stopped_by_itself(context):
    """An exception in the executor's thread leaves a process that runs nothing: the caller must know."""
    node = Node("doomed", context=context)

    def fail():
        raise RuntimeError("a callback failed")

    node.create_timer(0.05, fail)
    stop_event = threading.Event()
    guard = threading.Timer(20.0, stop_event.set)  # the test never hangs
    guard.start()
    try:
        assert bringup.spin_nodes([node], stop=stop_event, context=context, handle_signals=False) is False
        assert not stop_event.is_set()
    finally:
        guard.cancel()


def test_large_image_profile_is_used_unless_the_user_chose():
    env: dict[str, str] = {}
    path = bringup.use_large_image_profile(env)
    assert path is not None and path.name == "fastdds_large_images.xml" and path.is_file()
    assert env["FASTRTPS_DEFAULT_PROFILES_FILE"] == str(path)
    assert "<segment_size>" in path.read_text()
    mine = {"FASTRTPS_DEFAULT_PROFILES_FILE": "/etc/my_profile.xml"}
    assert bringup.use_large_image_profile(mine) is None
    assert mine["FASTRTPS_DEFAULT_PROFILES_FILE"] == "/etc/my_profile.xml"
    cyclone = {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}
    assert bringup.use_large_image_profile(cyclone) is None and "FASTRTPS_DEFAULT_PROFILES_FILE" not in cyclone

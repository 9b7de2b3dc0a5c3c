"""The C++ kernels' loader (core/render/_ext.py): cache key, status reporting, --version."""

from __future__ import annotations

import pytest

from xvr_ros.cli import main
from xvr_ros.core.render import _ext

BASE = dict(
    source=b"// kernel", torch_version="2.13.0", machine="x86_64", flags="avx2 fma sse4_2", cxx="/usr/bin/g++ 12"
)


def test_cache_key_changes_with_everything_the_build_depends_on():
    key = _ext.cache_key(**BASE)
    assert key == _ext.cache_key(**BASE)  # pure
    changes = dict(
        source=b"// kernel v2",
        torch_version="2.14.0",
        machine="aarch64",
        flags="avx2 avx512f fma sse4_2",  # a newer CPU of the same architecture
        cxx="/usr/bin/clang++ 17",
        source_path="/another/checkout/csrc/trilinear.cpp",
    )
    keys = {name: _ext.cache_key(**(BASE | {name: value})) for name, value in changes.items()}
    keys["cflags"] = _ext.cache_key(**BASE, cflags=("-O3", "-march=x86-64-v3"))
    assert key not in keys.values() and len(set(keys.values())) == len(keys), keys
    # the parts are separated: moving text from one part to the next gives another key
    assert _ext.cache_key(**(BASE | dict(machine="x86", flags="_64 avx2 fma sse4_2"))) != key


def test_cpu_flags_are_read_from_cpuinfo_in_a_stable_order():
    x86 = "processor\t: 0\nflags\t\t: sse4_2 avx2 fma avx2\nbugs\t\t: spectre\n\nprocessor\t: 1\nflags\t: xyz\n"
    assert _ext.cpu_flags(x86) == "avx2 fma sse4_2"  # first CPU, sorted, no duplicates, not the bugs line
    arm = "processor\t: 0\nFeatures\t: fp asimd aes\n"
    assert _ext.cpu_flags(arm) == "aes asimd fp"
    assert _ext.cpu_flags() == _ext.cpu_flags()


def test_build_dir_is_keyed_by_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XVR_ROS_EXT_DIR", str(tmp_path))
    here = _ext.build_dir("trilinear")
    assert here.parent == _ext.build_dir() and str(here).startswith(str(tmp_path))
    monkeypatch.setattr(_ext, "cpu_flags", lambda: "sse2")
    assert _ext.build_dir("trilinear") != here
    assert _ext.build_dir("siddon") != _ext.build_dir("trilinear")


def test_failures_are_reported_with_their_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "_LOADED", {})
    monkeypatch.setenv("XVR_ROS_EXT_DIR", str(tmp_path))
    before = _ext.status()
    assert {s.state for s in before.values()} == {"not loaded"}
    assert "not built yet" in before["trilinear"].reason
    monkeypatch.setenv("XVR_ROS_NO_EXT", "1")
    assert _ext.load("trilinear") is None
    status = _ext.warm()
    assert set(status) == set(_ext.KERNELS)
    for s in status.values():
        assert s.state == "unavailable" and not s.available and "XVR_ROS_NO_EXT" in s.reason
        assert "UNAVAILABLE" in str(s) and s.reason in str(s) and str(s.build_dir) in str(s)


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "_LOADED", {})
    monkeypatch.setenv("XVR_ROS_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("XVR_ROS_NO_EXT", raising=False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    _ext.compiler.cache_clear()
    try:
        status = _ext.warm()
    finally:
        _ext.compiler.cache_clear()
    assert all(s.state == "unavailable" and "no C++ compiler" in s.reason for s in status.values()), status


def test_failure_reason_is_the_compiler_error_line():
    log = (
        "Error building extension 'xvr_ros_trilinear': [1/2] c++ -MMD -c trilinear.cpp\n"
        "FAILED: trilinear.o\n"
        "trilinear.cpp:12:5: error: 'foo' was not declared in this scope\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert _ext._failure(RuntimeError(log)) == "trilinear.cpp:12:5: error: 'foo' was not declared in this scope"
    assert _ext._failure(RuntimeError("Ninja is required to load C++ extensions")).startswith("Ninja is required")
    assert len(_ext._failure(RuntimeError("x" * 1000))) == 300


def test_version_prints_the_kernel_status(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_ext, "_LOADED", {})
    monkeypatch.setenv("XVR_ROS_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("XVR_ROS_NO_EXT", "1")  # no build here: the status line is what is tested
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("xvr-ros ") and "torch " in out
    for name in _ext.KERNELS:
        assert f"{name}: UNAVAILABLE, torch fallback (disabled by XVR_ROS_NO_EXT" in out


def test_a_build_killed_mid_way_does_not_block_the_next_one(tmp_path):
    """The baton file torch leaves behind by a killed build, is cleared under the cross-process lock."""
    import fcntl

    (tmp_path / _ext.TORCH_BATON).touch()
    with _ext._build_lock(tmp_path):
        assert not (tmp_path / _ext.TORCH_BATON).exists()
        with open(tmp_path / "build.flock", "a") as other:  # another process would wait here
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "build.flock", "a") as other:  # released afterwards
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)

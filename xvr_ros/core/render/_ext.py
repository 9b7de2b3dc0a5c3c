"""Build-on-first-use loader for the package's C++ torch extensions.

The kernels are compiled with ``torch.utils.cpp_extension.load`` the first time they are
needed (``make setup`` and the nodes' start-up do it ahead of time with :func:`warm`) and cached
in ``$XVR_ROS_EXT_DIR`` or ``~/.cache/xvr_ros/ext``. When a kernel cannot be built the callers
fall back to the pure torch implementations, so the package still works, only slower; the
reason is kept and reported by :func:`status` (``xvr-ros --version``, setup output, the
nodes' diagnostics).

A build is compiled with ``-march=native``, so it is only valid on CPUs with the same
instruction-set extensions, built by the same compiler: the cache key (:func:`cache_key`) holds
the source and its path, the torch version, the compiler flags, the CPU's architecture and
feature flags and the compiler's path and version. A cache shared between machines (a network
home, a copied container) then holds one build per kind of machine instead of crashing on an
illegal instruction, and one shared between checkouts one build per checkout.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_LOG = logging.getLogger(__name__)
_CSRC = Path(__file__).resolve().parent / "csrc"

#: The kernels under csrc/, by name.
KERNELS = ("trilinear", "siddon")
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class KernelStatus:
    """Whether a kernel is in use in this process, and if not, why."""

    name: str
    state: str  # "compiled" (loaded), "unavailable" (the torch fallback is used) or "not loaded" (not tried yet)
    reason: str | None  # why it is unavailable or not loaded
    build_dir: Path

    @property
    def available(self) -> bool:
        return self.state == "compiled"

    def __str__(self) -> str:
        if self.state == "compiled":
            return f"{self.name}: compiled ({self.build_dir})"
        if self.state == "unavailable":
            return f"{self.name}: UNAVAILABLE, torch fallback ({self.reason}; build dir {self.build_dir})"
        return f"{self.name}: not loaded ({self.reason}; build dir {self.build_dir})"


def cpu_flags(cpuinfo: str | None = None) -> str:
    """The CPU's feature flags (what ``-march=native`` resolves from), sorted and space-separated.

    Read from the ``flags`` (x86) or ``Features`` (ARM) line of ``/proc/cpuinfo`` (or ``cpuinfo``,
    its text); ``platform.processor()`` where there is none.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return " ".join(sorted(set(value.split())))
    return platform.processor()


@functools.cache
def compiler() -> str:
    """The C++ compiler torch would use (``$CXX`` or ``c++``): resolved path and first line of
    ``--version``; ``"<name> (not found)"`` when it is not on the PATH."""
    from torch.utils import cpp_extension

    name = cpp_extension.get_cxx_compiler()
    path = shutil.which(name)
    if path is None:
        return f"{name} (not found)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        version = out.splitlines()[0].strip() if out.strip() else "unknown version"
    except (OSError, subprocess.SubprocessError):
        version = "unknown version"
    return f"{os.path.realpath(path)} {version}"


def cache_key(
    source: bytes, torch_version: str, machine: str, flags: str, cxx: str, cflags=CFLAGS, source_path: str = ""
) -> str:
    """Name of a build's cache entry: a hash of everything the compiled code depends on.

    source: the .cpp file's bytes; torch_version: ``torch.__version__``; machine:
    ``platform.machine()``; flags: :func:`cpu_flags`; cxx: :func:`compiler`; cflags: the
    compiler flags; source_path: where the .cpp file is (torch's build file names it, so two
    checkouts sharing one entry would rebuild it, ~30 s, each time the other loaded it). Pure:
    the same inputs always give the same key.
    """
    h = hashlib.sha256(source)
    for part in (torch_version, machine, flags, cxx, " ".join(cflags), source_path):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build_dir(name: str | None = None) -> Path:
    """The cache root for this torch version, or (with ``name``) that kernel's build directory on this machine."""
    root = os.environ.get("XVR_ROS_EXT_DIR") or Path.home() / ".cache" / "xvr_ros" / "ext"
    path = Path(root) / f"torch{torch.__version__.split('+')[0]}"
    if name is not None:
        cpp = _CSRC / f"{name}.cpp"
        key = cache_key(cpp.read_bytes(), torch.__version__, platform.machine(), cpu_flags(), compiler(),
                        source_path=str(cpp))
        path = path / f"{name}-{key}"
    return path


_LOCK = threading.Lock()
_LOADED: dict[str, tuple[object | None, KernelStatus]] = {}


def _failure(exc: Exception) -> str:
    """One line out of a build failure: the compiler's first error line if there is one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower()]
    text = (errors or lines or [type(exc).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


#: torch's own marker of a build in progress (``FileBaton``): a file that stays behind, and makes
#: every later ``cpp_extension.load`` wait forever, when a process is killed mid-build.
TORCH_BATON = "lock"


@contextlib.contextmanager
def _build_lock(out: Path):
    """Hold an exclusive ``flock`` on ``out/build.flock`` (one build at a time across processes;
    the kernel releases it when its holder dies), and clear a baton a killed build left behind:
    while the lock is held nobody else can be building in ``out``."""
    with open(out / "build.flock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            baton = out / TORCH_BATON
            if baton.exists():
                _LOG.warning("removing a stale build lock %s (a build was interrupted)", baton)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(name: str) -> tuple[object | None, KernelStatus]:
    out = build_dir(name)
    if os.environ.get("XVR_ROS_NO_EXT"):
        return None, KernelStatus(name, "unavailable", "disabled by XVR_ROS_NO_EXT", out)
    cxx = compiler()
    if cxx.endswith("(not found)"):
        return None, KernelStatus(name, "unavailable", f"no C++ compiler: {cxx}; install one or set CXX", out)
    from torch.utils import cpp_extension

    try:
        out.mkdir(parents=True, exist_ok=True)
        with _build_lock(out):
            module = cpp_extension.load(
                name=f"xvr_ros_{name}",
                sources=[str(_CSRC / f"{name}.cpp")],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(out),
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the torch path"
        reason = _failure(exc)
        _LOG.warning("C++ kernel %s unavailable (%s); using the slower torch implementation", name, reason)
        return None, KernelStatus(name, "unavailable", reason, out)
    return module, KernelStatus(name, "compiled", None, out)


def load(name: str):
    """Compile (once) and import ``csrc/<name>.cpp``; return the module, or None if it can't be built."""
    entry = _LOADED.get(name)
    if entry is None:
        with _LOCK:  # one build per kernel even when several threads want it first
            entry = _LOADED.get(name) or _LOADED.setdefault(name, _build(name))
    return entry[0]


def status() -> dict[str, KernelStatus]:
    """Each kernel's state in this process, without building anything."""
    out = {}
    for name in KERNELS:
        if name in _LOADED:
            out[name] = _LOADED[name][1]
        else:
            path = build_dir(name)
            cached = path.is_dir() and any(path.glob("*.so"))
            why = "a cached build is ready" if cached else "not built yet: the first use compiles it"
            out[name] = KernelStatus(name, "not loaded", why, path)
    return out


def warm() -> dict[str, KernelStatus]:
    """Build (or load the cached build of) every kernel now; return :func:`status`."""
    for name in KERNELS:
        load(name)
    return status()

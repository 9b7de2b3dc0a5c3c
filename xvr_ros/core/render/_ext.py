"""Build-on-first-use loader for the package's C++ torch extensions.

The kernels are compiled with ``torch.utils.cpp_extension.load`` the first time they are
needed (``make setup`` does it ahead of time) and cached in ``$XVR_ROS_EXT_DIR`` or
``~/.cache/xvr_ros/ext``. When no compiler is available the callers fall back to the pure
torch implementations, so the package still works, only slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

_LOG = logging.getLogger(__name__)
_CSRC = Path(__file__).resolve().parent / "csrc"


def build_dir() -> Path:
    root = os.environ.get("XVR_ROS_EXT_DIR") or Path.home() / ".cache" / "xvr_ros" / "ext"
    tag = f"torch{torch.__version__.split('+')[0]}"
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load(name: str):
    """Compile (once) and import ``csrc/<name>.cpp``; return the module, or None if it can't be built."""
    if os.environ.get("XVR_ROS_NO_EXT"):
        return None
    from torch.utils import cpp_extension

    src = _CSRC / f"{name}.cpp"
    # Keyed by the source's content: checkouts at other paths or revisions share a build when
    # the kernel is the same and never rebuild each other's.
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = build_dir() / f"{name}-{digest}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=f"xvr_ros_{name}",
            sources=[str(src)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(out),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the torch path"
        _LOG.warning("C++ kernel %s unavailable (%s); using the slower torch implementation", name, exc)
        return None

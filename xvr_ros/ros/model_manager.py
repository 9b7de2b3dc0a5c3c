"""``model_manager`` node: patient-specific models on disk, finetuning, and the active model.

Interfaces (names are parameters; relative names follow the node's namespace):

* action ``xvr/finetune`` (:class:`xvr_ros.action.Finetune`): train or finetune a pose regressor
  on a CT/MR and write it into the models directory.
* service ``xvr/load_model`` (:class:`xvr_ros.srv.LoadModel`): make a checkpoint the active model
  (a model name in the models directory, or a path; see "Where models may come from").
* topic ``xvr/model_info`` (:class:`xvr_ros.msg.ModelInfo`, latched: reliable + transient local,
  depth 1): the active model, its volume, the frames and the network's canonical intrinsics. A
  subscriber that starts later still gets the last one. Nothing is published before a model is
  active.
* ``/diagnostics``: node status once a second.

Where models may come from
--------------------------
Any node on the ROS graph can send a request, so a model named in one (``LoadModel.model``,
``Finetune.base_checkpoint``) must resolve, symlinks followed, inside the models directory
(``models_dir``) or one of the directories listed in ``model_dirs_allowed`` (default: none). A
plain name is looked up in the models directory (with or without ``.pth``); a relative path is
taken from the models directory, ``~`` is the node user's home. The check comes before the file
is opened, and a refusal names the rule. Finetune outputs are written to the models directory
only. The start-up ``model`` parameter is the operator's own and may be any path.

Goal policy (one goal at a time)
--------------------------------
Training takes the whole machine, so the node runs **one Finetune goal at a time**. A goal that
arrives while another is running (or being prepared) is **rejected** at once; the node logs why
(which goal is running, its progress, and "cancel it or wait") and reports it on
``/diagnostics``. There is no queue. Once the running goal has a result, the next goal is
accepted.

Goal semantics (metres and radians on the interface, REP 103; millimetres inside the core)
-----------------------------------------------------------------------------------------
* ``volume_path`` (NIfTI file or DICOM directory; required), ``labelmap_path`` (optional; needed
  when ``labels`` is given).
* ``preset`` and/or ``ranges`` (12 values ``alpha_lo, alpha_hi, beta_lo, beta_hi, gamma_lo,
  gamma_hi`` in rad, ``x_lo, x_hi, y_lo, y_hi, z_lo, z_hi`` in m): the ranges override the preset;
  without a preset all 12 are required.
* ``base_checkpoint``: model name or path to finetune; empty trains de novo. When finetuning, the
  network and its canonical detector come from the base checkpoint; de novo they come from the
  node's parameters (``model_name``, ``height``, ``canonical_sdd_mm``, ``canonical_delx_mm``).
* ``time_budget`` (s) and/or ``max_steps``: at least one must be positive.
* ``device``: torch device; empty = the node's ``device`` parameter.
* ``output_name``: file name in the models directory (``.pth`` is appended if missing); empty =
  ``model_<date>_<time>``. Path separators, ``..``, absolute paths and names not made of
  ``A-Z a-z 0-9 . _ -`` are refused, as is a name that resolves outside the directory (symlink).
  An existing model of the same name is replaced atomically.

Feedback is published at most ``feedback_rate_hz`` times a second (and always for the first
step): ``step``, ``max_steps`` (0 = time-bounded only), ``elapsed``, ``eta`` (s, -1 = unknown),
``loss_names``/``loss_values``: ``dgeo`` (geodesic pose distance, **metres**), ``ncc``
(1 - mNCC) and ``dice`` when used, and ``total`` (the optimised, dimensionless weighted loss).

Result: ``success``, ``model_path``, ``steps``, ``wall_time`` (s), held-out validation figures
``mtre_median``, ``mtre_q25``, ``mtre_q75``, ``dgeo_median`` (metres) and a human-readable
``message``. Outcomes:

* finished: status SUCCEEDED, ``success=True``; the new model becomes the active model.
* cancelled: training stops within one step, the model trained so far is validated and saved;
  status CANCELED, ``success=False``, ``model_path`` = the saved model, message starts with
  ``cancelled``. It is not made active (load it with ``xvr/load_model`` if wanted). A goal
  cancelled before training started writes nothing.
* bad goal (missing/unreadable volume, unknown preset, bad ranges, no limit, bad output name, bad
  base checkpoint, bad device, ...) or a training error: status ABORTED, ``success=False`` and a
  message saying what is wrong. The node keeps running.

Training runs in a worker thread; the action's execute callback only awaits it, so the executor
keeps serving the other callbacks (and the other nodes in an in-process bringup).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
)
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.task import Future
from std_msgs.msg import Header

from xvr_ros.action import Finetune
from xvr_ros.msg import ModelInfo
from xvr_ros.srv import LoadModel

from . import convert, qos
from .diagnostics import Diagnostics

__all__ = ["ModelManager", "GoalError", "MODEL_SUFFIX", "check_model_name", "main"]

#: Checkpoint file suffix in the models directory.
MODEL_SUFFIX = ".pth"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# The order of the 12 ``ranges`` values (lo, hi per parameter).
_RANGE_PARAMETERS = ("alpha", "beta", "gamma", "x", "y", "z")
_ANGLES = ("alpha", "beta", "gamma")

class GoalError(ValueError):
    """A goal or request that cannot be run; the message says what is wrong."""


def check_model_name(name: str) -> str:
    """A model file name for ``name`` (``.pth`` appended if missing), or GoalError.

    Refuses what could leave the models directory or surprise a shell: path separators, ``..``,
    absolute paths, leading dots, and characters other than ``A-Z a-z 0-9 . _ -``.
    """
    if not name:
        raise GoalError("empty model name")
    if "\x00" in name:
        raise GoalError(f"model name {name!r} contains a NUL byte")
    if os.path.isabs(name) or name.startswith("~"):
        raise GoalError(f"model name {name!r} is a path: give a plain file name inside the models directory")
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise GoalError(
            f"model name {name!r} contains a path separator: give a plain file name inside the models directory"
        )
    if ".." in name:
        raise GoalError(f"model name {name!r} contains '..'")
    if not _NAME_RE.fullmatch(name):
        raise GoalError(
            f"model name {name!r} is not allowed: use 1-128 of A-Z a-z 0-9 . _ - (not starting with '.' or '-')"
        )
    return name if name.endswith(MODEL_SUFFIX) else name + MODEL_SUFFIX


@dataclass
class _Job:
    """The one Finetune goal being prepared or run."""

    request: Finetune.Goal
    accepted: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    goal_handle: object = None
    name: str = ""
    step: int = 0
    max_steps: int = 0
    phase: str = "accepted"
    last_feedback: float = -math.inf
    thread: threading.Thread | None = None


@dataclass
class _Outcome:
    success: bool
    cancelled: bool = False
    message: str = ""
    path: Path | None = None
    steps: int = 0
    wall_time: float = 0.0
    validation: dict = field(default_factory=dict)


def _param(
    description: str, *, type_: int, read_only: bool = True, constraints: str = "", **ranges
) -> ParameterDescriptor:
    return ParameterDescriptor(
        description=description, type=type_, read_only=read_only, additional_constraints=constraints, **ranges
    )


# --------------------------------------------------------------------------------------------
# Finetune goal checks: each takes the goal, returns core values or raises GoalError
# --------------------------------------------------------------------------------------------
def _limits(g: Finetune.Goal) -> tuple[float, int]:
    """-> (time budget in s, max steps); 0 = no limit, but not both."""
    budget, steps = float(g.time_budget), int(g.max_steps)
    if not math.isfinite(budget) or budget < 0:
        raise GoalError(f"time_budget must be a finite number of seconds >= 0 (0 = no limit), got {g.time_budget}")
    if steps < 0:
        raise GoalError(f"max_steps must be >= 0 (0 = no limit), got {steps}")
    if budget == 0 and steps == 0:
        raise GoalError("no time or step limit: set time_budget (s) and/or max_steps; training must be bounded")
    return budget, steps


def _torch_device(name: str):
    """A torch.device that exists on this machine."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise GoalError(f"unknown device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GoalError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GoalError(f"device {name!r} requested but MPS is not available on this machine")
    return device


def _pose_distribution(g: Finetune.Goal) -> tuple[str | None, dict]:
    """-> (preset or None, the core's ranges in degrees and mm) from ``preset`` and/or ``ranges`` (rad, m)."""
    from xvr_ros.core.train.presets import PRESETS, resolve_ranges

    preset = g.preset.strip() or None
    values = [float(x) for x in g.ranges]
    if values and len(values) != 12:
        raise GoalError(
            f"ranges must have 12 values (alpha, beta, gamma lo/hi in rad; x, y, z lo/hi in m), got {len(values)}"
        )
    if preset is None and not values:
        raise GoalError(f"no pose distribution: give a preset ({', '.join(sorted(PRESETS))}) or 12 ranges")
    overrides = {}
    for i, key in enumerate(_RANGE_PARAMETERS if values else ()):
        lo, hi = values[2 * i], values[2 * i + 1]
        # convert.py has lengths only; angles: radians -> the core's preset degrees.
        to_core = math.degrees if key in _ANGLES else convert.m_to_mm
        overrides[key] = (float(to_core(lo)), float(to_core(hi)))
    try:
        return preset, resolve_ranges(preset, overrides)
    except ValueError as exc:
        raise GoalError(str(exc)) from None


def _labels(g: Finetune.Goal) -> tuple[list[int] | None, str | None]:
    """-> (labels or None, labelmap path or None); labels need a labelmap."""
    labels = [int(x) for x in g.labels] or None
    labelmap = g.labelmap_path.strip() or None
    if labels and labelmap is None:
        raise GoalError(f"labels {labels} given but no labelmap_path")
    return labels, labelmap


def _volume_path(g: Finetune.Goal) -> str:
    """The goal's volume path, checked to exist (it is read only after the other checks)."""
    volume_path = g.volume_path.strip()
    if not volume_path:
        raise GoalError("volume_path is empty: give a NIfTI file or a DICOM series directory")
    if not Path(volume_path).expanduser().exists():
        raise GoalError(f"volume {volume_path} does not exist")
    return volume_path


def _load_volume(volume_path: str, labelmap: str | None, labels: list[int] | None):
    """The core's Volume (with its label mask when ``labels`` are given); unreadable -> GoalError."""
    from xvr_ros.core.io.volume import VolumeError, load_volume

    try:
        volume = load_volume(volume_path, labelmap)
        if labels:
            volume.label_mask(labels)
    except VolumeError as exc:
        raise GoalError(f"unreadable volume: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - nibabel/pydicom fail in many ways on bad files
        raise GoalError(f"unreadable volume {volume_path}: {type(exc).__name__}: {exc}") from None
    return volume


def _allowed_directories(entries: list[str]) -> tuple[list[Path], list[str]]:
    """``model_dirs_allowed`` as the containment check compares it -> (directories, refused entries).

    Each directory is absolute with its symlinks resolved; an empty or relative entry is refused
    (it would silently allow the node's working directory).
    """
    dirs, refused = [], []
    for entry in entries:
        path = Path(os.path.expandvars(entry.strip())).expanduser()
        if entry.strip() and path.is_absolute():
            dirs.append(path.resolve())
        else:
            refused.append(entry)
    return dirs, refused


class ModelManager(Node):
    """Owns the models directory, serves ``Finetune`` and ``LoadModel``, publishes ``ModelInfo``.

    Keyword arguments go to :class:`rclpy.node.Node` (``namespace``, ``parameter_overrides``,
    ``context``, ``cli_args``, ...), so the node can be composed in one process by
    :mod:`xvr_ros.ros.bringup`.
    """

    def __init__(self, node_name: str = "model_manager", **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        T = ParameterType
        S, D, I, B = T.PARAMETER_STRING, T.PARAMETER_DOUBLE, T.PARAMETER_INTEGER, T.PARAMETER_BOOL  # noqa: E741
        declare = self.declare_parameter
        p = {
            "models_dir": declare(
                "models_dir",
                "~/.ros/xvr_ros/models",
                _param(
                    "Directory holding the models (checkpoints); created if missing. Finetune outputs "
                    "are written here and may not escape it.",
                    type_=S,
                ),
            ).value,
            "model_dirs_allowed": declare(
                "model_dirs_allowed",
                # No default value: an empty list literal would be typed as a byte array.
                Parameter.Type.STRING_ARRAY,
                _param(
                    "Extra directories that xvr/load_model and Finetune base_checkpoint may read models "
                    "from (symlinks are resolved before the check); unset = the models directory only.",
                    type_=T.PARAMETER_STRING_ARRAY,
                ),
            ).value
            or [],
            "model": declare(
                "model",
                "",
                _param(
                    "Model to make active at start-up: a name in models_dir or a checkpoint path; "
                    "empty = none until xvr/load_model or a finetune.",
                    type_=S,
                ),
            ).value,
            "volume_frame": declare(
                "volume_frame",
                "volume",
                _param("TF frame of the CT/MR volume (the frame poses are expressed in).", type_=S),
            ).value,
            "source_frame": declare(
                "source_frame",
                "carm_source_optical",
                _param(
                    "TF frame of the C-arm source, optical convention (x right, y down, z towards "
                    "the detector), consistent with the CameraInfo.",
                    type_=S,
                ),
            ).value,
            "device": declare(
                "device", "cpu", _param("Default torch device for finetuning (cpu, cuda, cuda:1, ...).", type_=S)
            ).value,
            "model_info_topic": declare(
                "model_info_topic", "xvr/model_info", _param("Latched ModelInfo topic.", type_=S)
            ).value,
            "finetune_action": declare(
                "finetune_action", "xvr/finetune", _param("Finetune action name.", type_=S)
            ).value,
            "load_model_service": declare(
                "load_model_service", "xvr/load_model", _param("LoadModel service name.", type_=S)
            ).value,
            "model_name": declare(
                "model_name",
                "",
                _param(
                    "Backbone for de novo training (resnet18, resnet34, ...); empty = per-device "
                    "default (resnet18 on CPU, resnet34 on CUDA).",
                    type_=S,
                ),
            ).value,
            "height": declare(
                "height",
                0,
                _param(
                    "Network input size for de novo training, pixels; 0 = per-device default (128).",
                    type_=I,
                    integer_range=[IntegerRange(from_value=0, to_value=1024, step=1)],
                ),
            ).value,
            "batch_size": declare(
                "batch_size",
                0,
                _param(
                    "Training batch size; 0 = per-device default (8 on CPU, 116 on CUDA).",
                    type_=I,
                    integer_range=[IntegerRange(from_value=0, to_value=4096, step=1)],
                ),
            ).value,
            "canonical_sdd_mm": declare(
                "canonical_sdd_mm",
                1020.0,
                _param(
                    "Source-to-detector distance of the canonical detector for de novo training, mm "
                    "(a training setting, passed to the core unchanged).",
                    type_=D,
                    floating_point_range=[FloatingPointRange(from_value=1.0, to_value=10000.0)],
                ),
            ).value,
            "canonical_delx_mm": declare(
                "canonical_delx_mm",
                2.0,
                _param(
                    "Pixel spacing of the canonical detector at the network input for de novo training, mm.",
                    type_=D,
                    floating_point_range=[FloatingPointRange(from_value=0.001, to_value=100.0)],
                ),
            ).value,
            "use_ncc": declare(
                "use_ncc",
                True,
                _param(
                    "Include the image loss (re-renders at the predicted pose; the paper's loss). "
                    "False trains faster on a CPU.",
                    type_=B,
                ),
            ).value,
            "validation_poses": declare(
                "validation_poses",
                64,
                _param(
                    "Held-out synthetic poses for the validation figures in the result.",
                    type_=I,
                    integer_range=[IntegerRange(from_value=2, to_value=10000, step=1)],
                ),
            ).value,
            "checkpoint_interval": declare(
                "checkpoint_interval",
                60.0,
                _param(
                    "Seconds between checkpoint writes during training (always written at the end and on cancel).",
                    type_=D,
                    floating_point_range=[FloatingPointRange(from_value=1.0, to_value=86400.0)],
                ),
            ).value,
            "seed": declare("seed", 0, _param("Random seed of pose sampling and augmentation.", type_=I)).value,
            "feedback_rate_hz": declare(
                "feedback_rate_hz",
                4.0,
                _param(
                    "Maximum Finetune feedback rate, Hz (every step is reported up to this rate).",
                    type_=D,
                    floating_point_range=[FloatingPointRange(from_value=0.1, to_value=1000.0)],
                ),
            ).value,
            "diagnostics_topic": declare(
                "diagnostics_topic", "/diagnostics", _param("diagnostic_msgs/DiagnosticArray output.", type_=S)
            ).value,
            "diagnostics_period": declare(
                "diagnostics_period",
                1.0,
                _param(
                    "Seconds between /diagnostics messages.",
                    type_=D,
                    floating_point_range=[FloatingPointRange(from_value=0.05, to_value=60.0)],
                ),
            ).value,
        }
        self._p = p
        self._models_dir = Path(os.path.expandvars(p["models_dir"])).expanduser().resolve()
        self._models_dir.mkdir(parents=True, exist_ok=True)
        self._dirs_allowed, refused_dirs = _allowed_directories(p["model_dirs_allowed"])

        self._lock = threading.Lock()  # guards _job and the status fields below
        self._job: _Job | None = None
        self._active: ModelInfo | None = None
        self._last_error = ""
        self._rejected = 0
        self._finished = 0

        self._info_pub = self.create_publisher(ModelInfo, p["model_info_topic"], qos.LATCHED)
        self._action = ActionServer(
            self,
            Finetune,
            p["finetune_action"],
            execute_callback=self._execute,
            goal_callback=self._on_goal,
            cancel_callback=self._on_cancel,
            callback_group=ReentrantCallbackGroup(),
        )
        self._service = self.create_service(
            LoadModel, p["load_model_service"], self._on_load_model, callback_group=MutuallyExclusiveCallbackGroup()
        )
        self._diagnostics = Diagnostics(
            self, topic=p["diagnostics_topic"], hardware_id=p["device"], period=p["diagnostics_period"]
        )
        self._update_status()

        if refused_dirs:
            self._error(f"model_dirs_allowed: ignored {refused_dirs}: give absolute directory paths")
        if p["model"]:
            try:
                self.activate(self.resolve_model(p["model"], confined=False))
            except GoalError as exc:  # a bad start-up model leaves the node running without one
                self._error(f"start-up model not loaded: {exc}")
        self.get_logger().info(
            f"models in {self._models_dir}; finetune action '{self.resolve_service_name(p['finetune_action'])}', "
            f"load models on '{self.resolve_service_name(p['load_model_service'])}', model info on "
            f"'{self._info_pub.topic_name}'"
        )

    # ----------------------------------------------------------------------------------------
    # Models
    # ----------------------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self._models_dir

    @property
    def active_model(self) -> ModelInfo | None:
        """The last published ModelInfo (None before a model is active)."""
        return self._active

    def output_path(self, name: str) -> Path:
        """The checkpoint path for an output name, inside the models directory (or GoalError)."""
        path = self._models_dir / check_model_name(name)
        if path.resolve().parent != self._models_dir:
            raise GoalError(
                f"model name {name!r} resolves outside the models directory {self._models_dir} (a symlink?)"
            )
        return path

    def resolve_model(self, ref: str, *, confined: bool = True) -> Path:
        """A model reference -> an existing checkpoint file, symlinks resolved (or GoalError).

        A reference with a path separator (or starting with ``~``) is a path; otherwise it is a name
        in the models directory, with or without ``.pth``. ``confined`` (every reference that comes
        in a request): relative paths are taken from the models directory and the resolved path
        must lie in it or in a ``model_dirs_allowed`` directory, checked before anything is opened
        (so a refusal says nothing about what exists outside). Unconfined (the operator's start-up
        ``model``): relative paths are taken from the working directory, ``$VARS`` are expanded.
        """
        ref = ref.strip()
        if not ref:
            raise GoalError("empty model reference: give a model name or a checkpoint path")
        if "\x00" in ref:
            raise GoalError(f"model reference {ref!r} contains a NUL byte")
        is_path = "/" in ref or os.sep in ref or ref.startswith("~")
        if is_path:
            candidates = [Path(ref if confined else os.path.expandvars(ref)).expanduser()]
        else:
            candidates = [self._models_dir / ref, self._models_dir / (ref + MODEL_SUFFIX)]
        base = self._models_dir if confined else Path.cwd()
        for candidate in candidates:
            path = (base / candidate).resolve()
            if confined:
                self._check_confined(ref, path)
            if path.is_file():
                return path
        if is_path:
            raise GoalError(f"checkpoint {ref!r} ({path}) does not exist or is not a file")
        check_model_name(ref)  # a bad name gets the specific reason
        known = self.list_models()
        listing = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "") if known else "none"
        raise GoalError(f"no model {ref!r} in {self._models_dir} (models there: {listing})")

    def _check_confined(self, ref: str, path: Path) -> None:
        """GoalError unless the resolved ``path`` lies in the models directory or an allowed one."""
        if any(path.is_relative_to(d) for d in (self._models_dir, *self._dirs_allowed)):
            return
        allowed = "[" + ", ".join(str(d) for d in self._dirs_allowed) + "]"
        raise GoalError(
            f"{ref!r} resolves to {path}, outside the models directory {self._models_dir} and the allowed "
            f"directories {allowed} (parameter model_dirs_allowed)"
        )

    def list_models(self) -> list[str]:
        """Model names in the models directory (without ``.pth``), sorted."""
        return sorted(
            p.name[: -len(MODEL_SUFFIX)]
            for p in self._models_dir.glob("*" + MODEL_SUFFIX)
            if p.is_file() and not p.name.startswith(".")
        )

    def activate(self, ref: str | Path) -> ModelInfo:
        """Validate a checkpoint, make it the active model and publish its ModelInfo (latched)."""
        from xvr_ros.core.model.checkpoint import load_checkpoint
        from xvr_ros.core.model.inference import canonical_detector

        path = ref if isinstance(ref, Path) else self.resolve_model(ref)
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
            info = self._model_info(path, ckpt, canonical_detector(ckpt))
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, the node goes on
            raise GoalError(f"not a usable model: {exc}") from None
        del ckpt  # the estimator/refiner load the weights themselves; only the facts are kept
        with self._lock:
            self._active = info
        self._info_pub.publish(info)
        message = f"active model: {info.model_name} ({path}), volume {info.volume_path or '?'}"
        self.get_logger().info(message)
        self._diagnostics.report("OK", message, log=False)
        self._update_status()
        return info

    def _model_info(self, path: Path, ckpt, detector) -> ModelInfo:
        meta = ckpt.metadata
        volume = meta.get("volume") or {}
        validation = meta.get("validation") or {}
        stamp = self.get_clock().now().to_msg()
        info = ModelInfo()
        info.header.stamp = stamp
        info.header.frame_id = self._p["volume_frame"]
        info.model_name = path.name[: -len(MODEL_SUFFIX)] if path.name.endswith(MODEL_SUFFIX) else path.stem
        info.model_path = str(path)
        info.volume_path = str(volume.get("path") or ckpt.config.get("volpath") or "")
        info.volume_sha256 = str(volume.get("sha256") or "")
        info.volume_frame = self._p["volume_frame"]
        info.source_frame = self._p["source_frame"]
        # xvr trains with reverse_x_axis=False (a mirrored image frame); the CameraInfo describes
        # the same pinhole (size, K) for the optical frame: the unmirrored detector with the same K.
        if not detector.reverse_x_axis:
            detector = dataclasses.replace(detector, reverse_x_axis=True, x0=-detector.x0)
        info.canonical_camera = convert.camera_info_from_detector(
            detector, Header(stamp=stamp, frame_id=self._p["source_frame"])
        )
        info.training_steps = int(meta.get("steps", ckpt.itr or 0) or 0)
        mtre = validation.get("mtre_median_mm")
        info.heldout_mtre_median = float(convert.mm_to_m(mtre)) if mtre is not None else math.nan
        return info

    def _on_load_model(self, request: LoadModel.Request, response: LoadModel.Response) -> LoadModel.Response:
        try:
            info = self.activate(request.model)
        except GoalError as exc:
            response.success = False
            response.message = f"cannot load model {request.model!r}: {exc}"
            self._error(response.message)
            return response
        response.success = True
        response.model_path = info.model_path
        response.message = f"model {info.model_name!r} is active"
        return response

    # ----------------------------------------------------------------------------------------
    # Finetune action
    # ----------------------------------------------------------------------------------------
    def _on_goal(self, request: Finetune.Goal) -> GoalResponse:
        with self._lock:
            job = self._job
            if job is None:
                self._job = _Job(request=request)
                return GoalResponse.ACCEPT
            self._rejected += 1
            progress = f"step {job.step}" + (f"/{job.max_steps}" if job.max_steps else "")
            reason = (
                f"rejected Finetune goal for {request.volume_path!r}: busy with {job.name or 'a goal'} "
                f"({job.phase}, {progress}, running {time.monotonic() - job.accepted:.0f} s); this node runs "
                f"one goal at a time, with no queue: cancel the running goal or wait for its result"
            )
        self.get_logger().warning(reason)
        self._diagnostics.report("WARN", reason, log=False, goals_rejected=self._rejected)
        return GoalResponse.REJECT

    def _on_cancel(self, goal_handle) -> CancelResponse:
        with self._lock:
            job = self._job
        if job is None:  # only the one accepted goal can be cancelled, and it is the job
            return CancelResponse.REJECT
        job.cancel.set()
        self.get_logger().info(f"cancelling finetune {job.name or ''}: stopping after the current step")
        return CancelResponse.ACCEPT

    async def _execute(self, goal_handle) -> Finetune.Result:
        with self._lock:
            job = self._job
        if job is None:  # cannot happen: the goal callback reserved the slot
            job = _Job(request=goal_handle.request)
            with self._lock:
                self._job = job
        job.goal_handle = goal_handle
        if goal_handle.is_cancel_requested:
            job.cancel.set()
        done = Future(executor=self.executor)
        done.add_done_callback(lambda _f: None)  # wakes the executor when the worker finishes

        def work():
            try:
                outcome = self._run(job)
            except BaseException as exc:  # noqa: BLE001 - reported in the result
                self.get_logger().error(traceback.format_exc())
                outcome = _Outcome(False, message=f"training failed: {type(exc).__name__}: {exc}")
            done.set_result(outcome)

        job.thread = threading.Thread(target=work, name="xvr-finetune", daemon=True)
        job.thread.start()
        outcome = _Outcome(False, message="internal error: the finetune ended without an outcome")
        result = self._result(outcome)
        try:
            outcome = await done
            result = self._result(outcome)
            if outcome.success:
                goal_handle.succeed()
                try:
                    self.activate(outcome.path)
                except GoalError as exc:
                    result.message += f"; but it could not be made active: {exc}"
            elif outcome.cancelled and goal_handle.is_cancel_requested:
                goal_handle.canceled()
            else:
                goal_handle.abort()
        finally:  # whatever happened, the next goal can come
            with self._lock:
                self._job = None
                self._finished += 1
                if not outcome.success and not outcome.cancelled:
                    self._last_error = result.message
        message = f"finetune: {result.message}"
        if outcome.success or outcome.cancelled:
            self.get_logger().info(message)
            self._diagnostics.report("OK", message, log=False)
        else:
            self.get_logger().error(message)
            self._diagnostics.report("ERROR", message, log=False)
        self._update_status()
        return result

    def _result(self, outcome: _Outcome) -> Finetune.Result:
        result = Finetune.Result()
        result.success = outcome.success
        result.message = outcome.message
        result.model_path = str(outcome.path) if outcome.path else ""
        result.steps = int(outcome.steps)
        result.wall_time = float(outcome.wall_time)
        v = outcome.validation
        nan = math.nan
        q25, q75 = (v.get("mtre_iqr_mm") or [nan, nan])[:2]
        result.mtre_median = float(convert.mm_to_m(v.get("mtre_median_mm", nan)))
        result.mtre_q25 = float(convert.mm_to_m(q25))
        result.mtre_q75 = float(convert.mm_to_m(q75))
        result.dgeo_median = float(convert.mm_to_m(v.get("dgeo_median_mm", nan)))
        return result

    def _prepare(self, job: _Job):
        """Check a goal and load what it needs -> (volume, TrainConfig, output path, base path).

        Cheap checks come first, so a bad goal fails before anything is read.
        """
        g = job.request
        budget, steps = _limits(g)
        out = self.output_path(g.output_name.strip() or datetime.datetime.now().strftime("model_%Y%m%d_%H%M%S"))
        job.name = out.name
        device = _torch_device(g.device.strip() or self._p["device"])
        preset, ranges = _pose_distribution(g)
        labels, labelmap = _labels(g)
        volume_path = _volume_path(g)
        arch, base = self._architecture(g.base_checkpoint.strip(), device)
        job.phase = "loading the volume"
        volume = _load_volume(volume_path, labelmap, labels)
        config = self._train_config(arch, device, preset, ranges, labels, budget, steps)
        return volume, config, out, base

    def _architecture(self, base_ref: str, device) -> tuple[dict, Path | None]:
        """The network and canonical detector to train -> (arch, base checkpoint path or None).

        Finetuning takes them from the base checkpoint (a confined model reference); de novo from
        the node's parameters and the device's defaults.
        """
        from xvr_ros.core.model.checkpoint import CheckpointError, load_checkpoint
        from xvr_ros.core.model.inference import canonical_detector
        from xvr_ros.core.model.network import default_network

        if not base_ref:
            net = default_network(device)
            arch = dict(
                model_name=self._p["model_name"] or net["model_name"],
                height=self._p["height"] or net["height"],
                sdd=self._p["canonical_sdd_mm"],
                delx=self._p["canonical_delx_mm"],
                reverse_x_axis=False,
            )
            return arch, None
        try:
            base = self.resolve_model(base_ref)
            ckpt = load_checkpoint(base, map_location="cpu")
            det = canonical_detector(ckpt)
        except (GoalError, CheckpointError, KeyError, TypeError, ValueError) as exc:
            raise GoalError(f"bad base checkpoint: {exc}") from None
        if det.height != det.width or det.delx != det.dely:
            raise GoalError(f"bad base checkpoint {base}: its canonical detector is not square ({det})")
        arch = dict(
            model_name=ckpt.model.architecture["model_name"],
            height=det.height,
            sdd=det.sdd,
            delx=det.delx,
            reverse_x_axis=det.reverse_x_axis,
        )
        return arch, base

    def _train_config(self, arch: dict, device, preset, ranges, labels, budget: float, steps: int):
        """The core's TrainConfig from the goal's checked values and the node's parameters."""
        from xvr_ros.core.model.network import default_network
        from xvr_ros.core.train.loop import TrainConfig

        return TrainConfig(
            ranges=ranges,
            preset=preset,
            labels=labels,
            model_name=arch["model_name"],
            height=int(arch["height"]),
            batch_size=self._p["batch_size"] or default_network(device)["batch_size"],
            max_steps=steps or None,
            time_budget=budget or None,
            w_ncc=1.0 if self._p["use_ncc"] else 0.0,
            w_dice=0.1 if labels else 0.0,
            sdd=float(arch["sdd"]),
            delx=float(arch["delx"]),
            reverse_x_axis=bool(arch["reverse_x_axis"]),
            checkpoint_interval=self._p["checkpoint_interval"],
            n_val=self._p["validation_poses"],
            seed=self._p["seed"],
            device=str(device),
        )

    def _run(self, job: _Job) -> _Outcome:
        """Worker thread: check the goal, train, and say what happened."""
        from xvr_ros.core.train.loop import train

        t0 = time.monotonic()
        try:
            volume, config, out, base = self._prepare(job)
        except GoalError as exc:
            return _Outcome(False, message=f"bad goal: {exc}", wall_time=time.monotonic() - t0)
        if job.cancel.is_set():
            return _Outcome(
                False,
                cancelled=True,
                message="cancelled before training started; no model written",
                wall_time=time.monotonic() - t0,
            )
        job.max_steps = config.max_steps or 0
        job.phase = "training"
        self._update_status()
        what = f"finetuning {base.name}" if base else "training de novo"
        limits = " and ".join(
            x
            for x in (
                f"{config.max_steps} steps" if config.max_steps else "",
                f"{config.time_budget:g} s" if config.time_budget else "",
            )
            if x
        )
        self.get_logger().info(
            f"{what} on {volume.source} -> {out} ({config.model_name}, {config.height} px, "
            f"batch {config.batch_size}, {config.device}, at most {limits})"
        )

        period = 1.0 / self._p["feedback_rate_hz"]

        def progress(p) -> None:
            job.step = p.step
            now = time.monotonic()
            if p.step > 1 and now - job.last_feedback < period:
                return
            job.last_feedback = now
            fb = Finetune.Feedback()
            fb.step = int(p.step)
            fb.max_steps = int(p.max_steps or 0)
            fb.elapsed = float(p.elapsed)
            fb.eta = float(p.eta) if p.eta is not None and math.isfinite(p.eta) else -1.0
            names, values = [], []
            for key, value in p.losses.items():
                names.append(key)
                values.append(float(convert.mm_to_m(value)) if key == "dgeo" else float(value))
            fb.loss_names, fb.loss_values = names, values
            job.goal_handle.publish_feedback(fb)
            self._update_status()

        r = train(volume, config, out, base=base, progress=progress, cancel=job.cancel)
        v = r.validation
        figures = (
            f"held-out mTRE median {v['mtre_median_mm']:.1f} mm "
            f"[IQR {v['mtre_iqr_mm'][0]:.1f}, {v['mtre_iqr_mm'][1]:.1f}], dGeo median {v['dgeo_median_mm']:.1f} mm"
        )
        if r.cancelled:
            message = (
                f"cancelled after {r.steps} steps ({r.elapsed:.1f} s); the model trained so far is saved "
                f"as {r.path} ({figures}); it is not active: load it with xvr/load_model if wanted"
            )
        else:
            message = f"trained {r.steps} steps in {r.elapsed:.1f} s -> {r.path}; {figures}"
        return _Outcome(
            not r.cancelled,
            cancelled=r.cancelled,
            message=message,
            path=Path(r.path),
            steps=r.steps,
            wall_time=r.elapsed,
            validation=v,
        )

    # ----------------------------------------------------------------------------------------
    # Status and shutdown
    # ----------------------------------------------------------------------------------------
    def _error(self, message: str) -> None:
        """A failed request: log it, report it on /diagnostics, and remember it in the status."""
        with self._lock:
            self._last_error = message
        self.get_logger().error(message)
        self._diagnostics.report("ERROR", message, log=False)
        self._update_status()

    def _update_status(self) -> None:
        """Publish the node's standing status on /diagnostics (re-published every period)."""
        with self._lock:
            job, active, last_error = self._job, self._active, self._last_error
            values = {
                "models_dir": str(self._models_dir),
                "active_model": active.model_path if active else "",
                "finetune": "idle" if job is None else f"{job.phase} {job.name}".strip(),
                "step": job.step if job else 0,
                "max_steps": job.max_steps if job else 0,
                "goals_finished": self._finished,
                "goals_rejected": self._rejected,
                "last_error": last_error,
            }
        if job is not None:
            steps = f"step {job.step}" + (f"/{job.max_steps}" if job.max_steps else "")
            level, message = "OK", f"finetuning {job.name or ''}: {job.phase}, {steps}"
        elif active is None:
            level, message = "WARN", "no model active: finetune one or call xvr/load_model"
        else:
            level, message = "OK", f"model {active.model_name!r} active"
        self._diagnostics.set_state(level, message, values, log=False)

    def destroy_node(self) -> None:
        """Cancel a running finetune (its model is saved) before the node goes away."""
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel.set()
            if job.thread is not None:
                job.thread.join(timeout=60.0)
        self._diagnostics.destroy()
        self._action.destroy()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run xvr_ros model_manager [--ros-args ...]``."""
    from .bringup import run_node

    return run_node(ModelManager, args)


if __name__ == "__main__":
    import sys

    sys.exit(main())

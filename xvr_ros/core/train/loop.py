"""Self-supervised training and finetuning of patient-specific pose regressors (method.md §3).

Each step samples C-arm poses from a preset, renders DRRs at a canonical detector, applies
intensity-only augmentations (never geometric: they would change the pose label), predicts the
poses, re-renders at the predictions and minimises

    L = w_geo * dGeo(T, T_hat) + w_ncc * (1 - mNCC(I, I_hat)) + w_dice * Dice(S, S_hat)   (Eq. 24)

with the paper's weights (0.01, 1, 0.1). ``w_ncc = 0`` skips the re-render (cheaper on a CPU).
Training is bounded by a step count and/or a wall-time budget, reports progress through a
callback, can be cancelled from another thread within one step, writes checkpoints atomically at
intervals and at the end (also on cancel), and resumes from its own checkpoints.

Units: degrees and mm in presets and reports, radians and mm inside.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from xvr_ros.core import metrics
from xvr_ros.core.geometry import Detector, carm_parameters
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.metrics import body_points
from xvr_ros.core.model.checkpoint import (
    config_from_model,
    load_checkpoint,
    save_checkpoint,
)
from xvr_ros.core.model.network import PoseRegressor, normalize_xray
from xvr_ros.core.register import similarity
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.rotations import so3_log
from xvr_ros.core.train.augment import augment, minmax
from xvr_ros.core.train.presets import resolve_ranges, sample_poses


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - Dice between (B, C, H, W) soft masks in [0, 1] -> (B,)."""
    inter = (pred * target).flatten(1).sum(1)
    return 1 - (2 * inter + eps) / (pred.flatten(1).sum(1) + target.flatten(1).sum(1) + eps)


# --------------------------------------------------------------------------------------------
# Configuration, progress, results
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a run needs besides the volume. Lengths mm, angles degrees, times seconds."""

    ranges: dict
    preset: str | None = None
    labels: list[int] | None = None
    model_name: str = "resnet18"
    norm_layer: str = "groupnorm"
    parameterization: str = "quaternion_adjugate"
    convention: str | None = "ZXY"
    height: int = 128
    batch_size: int = 8
    lr: float = 2e-4
    warmup_steps: int = 50
    max_steps: int | None = None
    time_budget: float | None = None
    w_geo: float = 0.01
    w_ncc: float = 1.0
    w_dice: float = 0.1
    augment_p: float = 0.333
    sdd: float = 1020.0
    delx: float = 2.0  # canonical detector: height x height pixels of delx mm
    reverse_x_axis: bool = False  # xvr's training default
    checkpoint_interval: float = 60.0
    validation_interval: float | None = None  # s; validate during training to record the learning curve
    n_val: int = 64
    seed: int = 0
    device: str = "cpu"

    def detector(self) -> Detector:
        return Detector(self.sdd, self.height, self.height, self.delx, self.delx, reverse_x_axis=self.reverse_x_axis)


@dataclass
class Progress:
    """Reported after every step."""

    step: int
    max_steps: int | None
    elapsed: float  # s, including earlier runs that this one resumed
    eta: float | None  # s until the step or time limit, whichever comes first
    losses: dict[str, float]
    lr: float


@dataclass
class TrainResult:
    path: Path
    steps: int
    elapsed: float
    cancelled: bool
    validation: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # (step, elapsed, figures) during training


def _lr(config: TrainConfig, step: int, fraction: float) -> float:
    """Linear warm-up, then cosine decay over the run's fraction done (steps or time)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))



def _render_pair(renderer: Renderer, pose: torch.Tensor, detector: Detector, channels: bool):
    """Render (B, C, H, W); return the intensity image (B, 1, H, W) and soft masks (or None)."""
    img = renderer(pose, detector)
    if not channels:
        return img, None
    masks = img / (img.flatten(2).amax(-1)[..., None, None] + 1e-6)
    return img.sum(1, keepdim=True), masks


@torch.no_grad()
def validate(model: PoseRegressor, renderer: Renderer, config: TrainConfig, points: torch.Tensor) -> dict:
    """Held-out synthetic poses (fixed seed) -> error figures and covariances.

    Returns per-parameter mean absolute errors (deg / mm), median/mean mTRE and dGeo (mm), the
    6x6 covariance of the C-arm parameter errors (alpha, beta, gamma in rad; x, y, z in mm) and
    the 6x6 covariance of the pose error as ROS orders it (camera-centre error x, y, z in world
    mm; rotation-vector error in world frame, rad).
    """
    model.eval()
    det = config.detector()
    gen = torch.Generator().manual_seed(10_000 + config.seed)
    true = sample_poses(config.ranges, config.n_val, gen, config.device)
    pred = []
    for chunk in true.split(16):
        img = renderer(chunk, det).sum(1, keepdim=True)
        pred.append(model(normalize_xray(img, config.height)))
    pred = torch.cat(pred).double()
    true = true.double()
    a_t, x_t = carm_parameters(true)
    a_p, x_p = carm_parameters(pred)
    da = torch.remainder(a_p - a_t + math.pi, 2 * math.pi) - math.pi
    carm_err = torch.cat([da, x_p - x_t], dim=-1)
    rot_err = so3_log(pred[:, :3, :3] @ true[:, :3, :3].transpose(-1, -2))
    pose_err = torch.cat([pred[:, :3, 3] - true[:, :3, 3], rot_err], dim=-1)
    mtre = metrics.mtre(true, pred, points.to(true))
    dgeo = metrics.dgeo(true, pred, config.sdd)
    mae = carm_err.abs().mean(0)
    model.train()
    return {
        "n": config.n_val,
        "mae_alpha_deg": math.degrees(mae[0]),
        "mae_beta_deg": math.degrees(mae[1]),
        "mae_gamma_deg": math.degrees(mae[2]),
        "mae_x_mm": float(mae[3]),
        "mae_y_mm": float(mae[4]),
        "mae_z_mm": float(mae[5]),
        "mtre_median_mm": float(mtre.median()),
        "mtre_mean_mm": float(mtre.mean()),
        "mtre_iqr_mm": [float(mtre.quantile(0.25)), float(mtre.quantile(0.75))],
        "dgeo_median_mm": float(dgeo.median()),
        "carm_covariance": torch.cov(carm_err.T).tolist(),
        "pose_covariance": torch.cov(pose_err.T).tolist(),
    }


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(
    volume: Volume,
    config: TrainConfig,
    out: str | Path,
    *,
    base: str | Path | None = None,
    resume: bool = False,
    patient_to_template: torch.Tensor | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Train (``base=None``), finetune (``base`` = a checkpoint, e.g. a foundation model) or
    resume (``resume=True``: continue from ``out``) a patient-specific pose regressor.

    Stops at ``config.max_steps`` or ``config.time_budget`` seconds, whichever comes first (at
    least one must be set), or within one step of ``cancel`` being set. Writes ``out``
    atomically every ``config.checkpoint_interval`` seconds and at the end, cancel included.
    """
    if config.max_steps is None and config.time_budget is None:
        raise ValueError("give max_steps and/or time_budget: training must be bounded")
    out = Path(out)
    device = torch.device(config.device)
    config.ranges = resolve_ranges(None, config.ranges)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    step, elapsed_before, raw = 0, 0.0, {}
    if resume:
        ckpt = load_checkpoint(out, map_location=device)
        model, raw = ckpt.model, ckpt.raw
        step = int(ckpt.itr or 0)
        elapsed_before = float(ckpt.metadata.get("wall_time_s", 0.0))
        gen_state = ckpt.metadata.get("rng_state")
        if gen_state is not None:
            gen.set_state(gen_state)
    elif base is not None:
        model = load_checkpoint(base, map_location=device).model
    else:
        model = PoseRegressor(
            config.model_name, config.parameterization, config.convention, config.norm_layer, config.height
        )
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if raw.get("optimizer_state_dict"):
        optimizer.load_state_dict(raw["optimizer_state_dict"])

    channels = bool(config.labels) and config.w_dice > 0
    renderer = Renderer(volume, labels=config.labels, label_channels=channels, device=device)
    detector = config.detector()
    points = body_points(volume, labels=config.labels)
    p2t = torch.eye(4, dtype=torch.float64) if patient_to_template is None else patient_to_template.double()

    def metadata(validation=None):
        return {
            "volume": {
                "path": volume.source,
                "sha256": volume.sha256,
                "shape": list(volume.shape),
                "spacing_mm": volume.spacing.tolist(),
            },
            "labels": config.labels,
            "preset": config.preset,
            "ranges": {k: list(v) for k, v in config.ranges.items()},
            "intrinsics": {
                "sdd": detector.sdd,
                "height": detector.height,
                "width": detector.width,
                "delx": detector.delx,
                "dely": detector.dely,
                "x0": 0.0,
                "y0": 0.0,
                "reverse_x_axis": detector.reverse_x_axis,
                "orientation": detector.orientation,
            },
            "network": model.architecture,
            "train_config": {k: v for k, v in asdict(config).items() if k != "ranges"},
            "base_checkpoint": str(base) if base else None,
            "steps": step,
            "wall_time_s": elapsed_before + (time.perf_counter() - t0),
            "patient_to_template": p2t,
            "rng_state": gen.get_state(),
            "validation": validation or {},
            "validation_history": history,
            "written": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def write(validation=None):
        xvr_config = config_from_model(
            model,
            delx=detector.delx,
            sdd=detector.sdd,
            orientation=detector.orientation,
            reverse_x_axis=detector.reverse_x_axis,
            batch_size=config.batch_size,
            lr=config.lr,
            **{
                f"{k}{m}": (config.ranges[k][0] if m == "min" else config.ranges[k][1])
                for k in ("alpha", "beta", "gamma")
                for m in ("min", "max")
            },
            **{
                f"t{k}{m}": (config.ranges[k][0] if m == "min" else config.ranges[k][1])
                for k in ("x", "y", "z")
                for m in ("min", "max")
            },
        )
        save_checkpoint(out, model, xvr_config, metadata=metadata(validation), optimizer=optimizer, itr=step)

    t0 = time.perf_counter()
    last_write = last_validation = t0
    cancelled = False
    history: list[dict] = list(raw.get("xvr_ros", {}).get("validation_history", []))

    def curve_point(figures):
        keys = ("mtre_median_mm", "mtre_iqr_mm", "dgeo_median_mm")
        return {"step": step, "elapsed_s": elapsed_before + time.perf_counter() - t0} | {k: figures[k] for k in keys}

    def fraction():
        fracs = []
        if config.max_steps is not None:
            fracs.append(step / config.max_steps if config.max_steps > 0 else 1.0)
        if config.time_budget:
            fracs.append((elapsed_before + time.perf_counter() - t0) / config.time_budget)
        return max(fracs)

    while fraction() < 1.0:
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        lr = _lr(config, step, fraction())
        for group in optimizer.param_groups:
            group["lr"] = lr
        true = sample_poses(config.ranges, config.batch_size, gen, device)
        with torch.no_grad():
            img, masks = _render_pair(renderer, true, detector, channels)
        x = normalize_xray(augment(minmax(img), gen, config.augment_p), config.height)
        pred = model(x)
        losses = {"dgeo": metrics.dgeo(true, pred, config.sdd, eps=1e-4).mean()}
        if config.w_ncc > 0 or channels:
            img_hat, masks_hat = _render_pair(renderer, pred, detector, channels)
            if config.w_ncc > 0:
                losses["ncc"] = (1 - similarity.mncc(img_hat, img)).mean()
            if channels:
                losses["dice"] = soft_dice_loss(masks_hat, masks).mean()
        loss = (
            config.w_geo * losses["dgeo"]
            + config.w_ncc * losses.get("ncc", 0.0)
            + config.w_dice * losses.get("dice", 0.0)
        )
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
        step += 1
        if progress is not None:
            done = fraction()
            elapsed = elapsed_before + time.perf_counter() - t0
            eta = elapsed / done * (1 - done) if done > 0 else None
            progress(
                Progress(
                    step,
                    config.max_steps,
                    elapsed,
                    eta,
                    {k: float(v.detach()) for k, v in losses.items()} | {"total": float(loss.detach())},
                    lr,
                )
            )
        if config.validation_interval and time.perf_counter() - last_validation > config.validation_interval:
            history.append(curve_point(validate(model, renderer, config, points)))
            last_validation = time.perf_counter()
        if time.perf_counter() - last_write > config.checkpoint_interval:
            write()
            last_write = time.perf_counter()

    validation = validate(model, renderer, config, points)
    history.append(curve_point(validation))
    write(validation)
    return TrainResult(out, step, elapsed_before + time.perf_counter() - t0, cancelled, validation, history)

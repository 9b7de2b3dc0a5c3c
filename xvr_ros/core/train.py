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
import torch.nn.functional as F

from . import metrics, similarity
from .checkpoint import config_from_model, load_checkpoint, save_checkpoint
from .geometry import Detector, carm_parameters, carm_pose, invert
from .network import PoseRegressor, normalize_xray
from .render import Renderer
from .rotations import so3_log
from .volume import Volume

# Table S2 of the paper: uniform ranges per C-arm parameter, (degrees, degrees, degrees, mm, mm, mm).
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "foundation": dict(alpha=(-180, 180), beta=(-60, 60), gamma=(-30, 30), x=(-150, 150), y=(450, 1000), z=(-150, 150)),
    "pelvis": dict(alpha=(135, 225), beta=(-45, 45), gamma=(-15, 15), x=(-150, 150), y=(450, 1000), z=(-150, 150)),
    "femur": dict(alpha=(75, 270), beta=(-20, 20), gamma=(-20, 20), x=(-75, 75), y=(650, 950), z=(-100, 100)),
    "neuro": dict(alpha=(-45, 90), beta=(-5, 5), gamma=(-5, 5), x=(-25, 25), y=(700, 800), z=(-25, 25)),
    "skull": dict(alpha=(55, 305), beta=(-45, 45), gamma=(-15, 15), x=(-200, 200), y=(500, 1000), z=(-200, 200)),
    # Not in the paper: frontal chest views around AP, used by the demo and the benchmarks.
    "chest": dict(alpha=(-30, 30), beta=(-15, 15), gamma=(-10, 10), x=(-30, 30), y=(750, 950), z=(-30, 30)),
}
PARAMETERS = ("alpha", "beta", "gamma", "x", "y", "z")


def resolve_ranges(preset: str | None = None, ranges: dict | None = None) -> dict[str, tuple[float, float]]:
    """A preset's ranges, with any of them overridden by ``ranges`` (degrees / mm)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or give ranges")
    out = dict(PRESETS[preset]) if preset else {}
    for key, value in (ranges or {}).items():
        if key not in PARAMETERS:
            raise ValueError(f"unknown pose parameter {key!r}; ranges use {PARAMETERS}")
        out[key] = (float(value[0]), float(value[1]))
    missing = [p for p in PARAMETERS if p not in out]
    if missing:
        raise ValueError(f"pose ranges missing for {missing}: give a preset or all six ranges")
    for key, (lo, hi) in out.items():
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"pose range for {key} must be finite with lo <= hi, got ({lo}, {hi})")
    return out


def sample_poses(ranges: dict, n: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Uniform C-arm parameters within ``ranges`` -> (n, 4, 4) poses (mm)."""
    lo = torch.tensor([ranges[p][0] for p in PARAMETERS], dtype=torch.float64)
    hi = torch.tensor([ranges[p][1] for p in PARAMETERS], dtype=torch.float64)
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    params = lo + u * (hi - lo)
    return carm_pose(params[:, :3], params[:, 3:], degrees=True).to(device=device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Intensity augmentations (on min-max scaled images in [0, 1])
# --------------------------------------------------------------------------------------------
def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device).square() / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def augment(img: torch.Tensor, generator: torch.Generator, p: float = 0.333) -> torch.Tensor:
    """Random intensity augmentations of (B, 1, H, W) images scaled to [0, 1], each with probability p.

    Noise, local contrast equalisation, blur, sharpen, gamma, random rectangular masking and
    simulated collimation — never geometric.
    """
    B, _, H, W = img.shape
    out = []
    for x in img.split(1):
        def coin():
            return float(torch.rand((), generator=generator)) < p

        def uniform(lo, hi):
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        if coin():  # gamma: detectors and post-processing bend the intensity curve
            x = x.clamp(min=0) ** uniform(0.7, 1.8)
        if coin():  # local contrast equalisation, as CLAHE-like post-processing does
            local = _gaussian_blur(x, uniform(4, 12))
            x = (x + uniform(0.5, 2.0) * (x - local)).clamp(0, 1)
        if coin():
            x = _gaussian_blur(x, uniform(0.5, 1.5))
        if coin():  # sharpen (unsharp mask)
            x = (x + uniform(0.3, 1.0) * (x - _gaussian_blur(x, 1.0))).clamp(0, 1)
        if coin():
            x = x + uniform(0.005, 0.03) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        if coin():  # random rectangular masking (erasing)
            h, w = int(uniform(0.05, 0.3) * H), int(uniform(0.05, 0.3) * W)
            r, c = int(uniform(0, H - h)), int(uniform(0, W - w))
            x = x.clone()
            x[..., r : r + h, c : c + w] = uniform(0, 1)
        if coin():  # simulated collimation: zero a margin on each side
            m = [int(uniform(0, 0.12) * s) for s in (H, H, W, W)]
            x = x.clone()
            x[..., : m[0], :] = 0
            x[..., H - m[1] :, :] = 0
            x[..., :, : m[2]] = 0
            x[..., :, W - m[3] :] = 0
        out.append(x)
    return torch.cat(out)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo + 1e-6)


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


def body_points(volume: Volume, n: int = 200, seed: int = 0, labels: list[int] | None = None) -> torch.Tensor:
    """(n, 3) world-mm points at random voxels inside the body (or the selected labels)."""
    if labels:
        inside = volume.label_mask(labels)
    else:
        # Above the median attenuation of non-air voxels: soft tissue and bone, not the lungs.
        inside = volume.data > volume.data[volume.data > 0].median()
    idx = inside.nonzero()
    gen = torch.Generator().manual_seed(seed)
    pick = idx[torch.randint(len(idx), (n,), generator=gen)].to(torch.float64)
    return volume.index_to_world(pick)


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
        model = PoseRegressor(config.model_name, config.parameterization, config.convention, config.norm_layer, config.height)
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
            "volume": {"path": volume.source, "sha256": volume.sha256, "shape": list(volume.shape), "spacing_mm": volume.spacing.tolist()},
            "labels": config.labels,
            "preset": config.preset,
            "ranges": {k: list(v) for k, v in config.ranges.items()},
            "intrinsics": {"sdd": detector.sdd, "height": detector.height, "width": detector.width, "delx": detector.delx, "dely": detector.dely, "x0": 0.0, "y0": 0.0, "reverse_x_axis": detector.reverse_x_axis, "orientation": detector.orientation},
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
            model, delx=detector.delx, sdd=detector.sdd, orientation=detector.orientation,
            reverse_x_axis=detector.reverse_x_axis, batch_size=config.batch_size, lr=config.lr,
            **{f"{k}{m}": (config.ranges[k][0] if m == "min" else config.ranges[k][1]) for k in ("alpha", "beta", "gamma") for m in ("min", "max")},
            **{f"t{k}{m}": (config.ranges[k][0] if m == "min" else config.ranges[k][1]) for k in ("x", "y", "z") for m in ("min", "max")},
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
        x = normalize_xray(augment(_minmax(img), gen, config.augment_p), config.height)
        pred = model(x)
        losses = {"dgeo": metrics.dgeo(true, pred, config.sdd, eps=1e-4).mean()}
        if config.w_ncc > 0 or channels:
            img_hat, masks_hat = _render_pair(renderer, pred, detector, channels)
            if config.w_ncc > 0:
                losses["ncc"] = (1 - similarity.mncc(img_hat, img)).mean()
            if channels:
                losses["dice"] = soft_dice_loss(masks_hat, masks).mean()
        loss = config.w_geo * losses["dgeo"] + config.w_ncc * losses.get("ncc", 0.0) + config.w_dice * losses.get("dice", 0.0)
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
            progress(Progress(step, config.max_steps, elapsed, eta, {k: float(v.detach()) for k, v in losses.items()} | {"total": float(loss.detach())}, lr))
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


def predict(checkpoint, image: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) X-rays already at the checkpoint's canonical intrinsics -> (B, 4, 4) poses (mm).

    Poses of a foundation model are in its template's frame; they are mapped into the patient's
    world through the inverse of the checkpoint's ``patient_to_template`` transform.
    """
    model = checkpoint.model
    with torch.no_grad():
        pose = model(normalize_xray(image, model.height))
    p2t = checkpoint.metadata.get("patient_to_template")
    if p2t is not None:
        pose = invert(torch.as_tensor(p2t, dtype=pose.dtype, device=pose.device)) @ pose
    return pose


"""Self-supervised training and finetuning of patient-specific pose regressors (method.md §3).

Each step samples C-arm poses from a preset and renders DRRs (or draws them from a pool of DRRs
rendered earlier, ``pool_size``, ``pool_refresh`` of them re-rendered at new poses every step: on
a CPU rendering costs as much as the network's forward pass), turns a fraction ``carm_p`` of them
into what a C-arm shows of the same pose (:class:`~.augment.CarmAugment`: instruments, a field
larger or smaller than the canonical one, zoom and pan brought back by Eq. 26, collimators,
circles, noise, gamma; the network sees only the field of view, as at inference), applies
intensity augmentations, predicts the poses, re-renders at the predictions and minimises

    L = w_geo * dGeo(T, T_hat) + w_ncc * (1 - mNCC(I, I_hat)) + w_dice * Dice(S, S_hat)   (Eq. 24)

with the paper's weights (0.01, 1, 0.1). ``w_ncc = 0`` skips the re-render (cheaper on a CPU).
With ``prefetch`` the next batch is prepared in a worker thread while the network trains on this
one, and torch runs ``threads`` threads. The defaults (no prefetch, torch's threads) are the
fastest on a CPU that training has to itself (``bench/bench_train.py`` measures each); on a CPU
shared with other busy processes, ``threads=1`` with ``prefetch`` can be faster, since an OpenMP
pool that competes for cores waits for time slices.
Training is bounded by a step count and/or a wall-time budget, reports progress through a
callback, can be cancelled from another thread within one step, writes checkpoints atomically at
intervals and at the end (also on cancel), and resumes from its own checkpoints (exactly, i.e.
as if never interrupted, without a pool; a pool is rendered afresh on resuming).

Validation (:func:`validate`) scores held-out poses twice: on clean DRRs, and on C-arm views of
them given to the network as inference gives them (detected field of view); the second is what
the checkpoint's covariance comes from.

Units: degrees and mm in presets and reports, radians and mm inside.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
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
from xvr_ros.core.model.inference import FIELD_OF_VIEW_INPUT, initial_input
from xvr_ros.core.model.network import PoseRegressor, normalize_xray
from xvr_ros.core.register import similarity
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.rotations import so3_log
from xvr_ros.core.train.augment import CarmAugment, augment, carm_views, minmax
from xvr_ros.core.train.presets import resolve_ranges, sample_poses


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - Dice between (B, C, H, W) soft masks in [0, 1] -> (B,)."""
    inter = (pred * target).flatten(1).sum(1)
    return 1 - (2 * inter + eps) / (pred.flatten(1).sum(1) + target.flatten(1).sum(1) + eps)


# --------------------------------------------------------------------------------------------
# Configuration, progress, results
# --------------------------------------------------------------------------------------------
#: Field rendered beyond each edge of the canonical detector for C-arm views, fraction of its side:
#: a real detector usually sees more than the canonical 256 mm (e.g. 512 px of 0.58 mm).
VIEW_MARGIN = 0.15


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
    carm_p: float = 0.8  # fraction of training images made C-arm views (0: clean DRRs, whole-image input)
    render_margin: float = VIEW_MARGIN  # C-arm views: field rendered beyond each canonical edge, fraction of a side
    pool_size: int = 256  # DRRs rendered once and reused with fresh augmentations (0: render every batch)
    pool_refresh: int = 2  # pool entries re-rendered at new poses every step
    threads: int | None = None  # torch CPU threads during training (None: torch's own setting)
    prefetch: bool = False  # prepare the next batch in a worker thread while the network trains
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

    def margin(self) -> int:
        """Pixels rendered beyond each edge of the canonical detector (C-arm views see past it)."""
        return round(self.render_margin * self.height) if self.carm_p > 0 else 0

    def render_detector(self) -> Detector:
        """The detector DRRs are rendered at: the canonical one grown by :meth:`margin` on every side."""
        return _grown(self.detector(), self.margin())


def _grown(detector: Detector, m: int) -> Detector:
    """``detector`` (centred principal point) with ``m`` more pixels on every side."""
    return replace(detector, height=detector.height + 2 * m, width=detector.width + 2 * m)


def _crop(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, C, H, W) -> the centre, ``m`` pixels in from every edge."""
    return x[..., m : x.shape[-2] - m, m : x.shape[-1] - m] if m else x


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


@dataclass
class HeldOut:
    """The validation images, made once per run: poses (n, 4, 4) mm, and (n, 1, H, W) network inputs
    at the canonical detector before :func:`normalize_xray`: ``clean`` DRRs and ``degraded`` C-arm
    views of the same poses as inference prepares them."""

    poses: torch.Tensor
    clean: torch.Tensor
    degraded: torch.Tensor


@torch.no_grad()
def held_out(renderer: Renderer, config: TrainConfig) -> HeldOut:
    """Held-out poses (fixed seed, never trained on), their DRRs, and a C-arm view of each (every one
    degraded by :class:`~.augment.CarmAugment`) prepared by
    :func:`~xvr_ros.core.model.inference.initial_input`: the field of view detected, not the true one."""
    m = round(VIEW_MARGIN * config.height)
    det = config.detector()
    source = _grown(det, m)
    gen = torch.Generator().manual_seed(10_000 + config.seed)
    poses = sample_poses(config.ranges, config.n_val, gen, config.device)
    rendered = torch.cat([renderer(chunk, source).sum(1, keepdim=True) for chunk in poses.split(16)])
    rng = np.random.default_rng(10_000 + config.seed)
    carm, mu_scale = CarmAugment(), float(renderer.volume.data.max())
    degraded = []
    for b in range(len(poses)):
        image, view, _ = carm.apply(rendered[b, 0], poses[b], source, rng, mu_scale)
        degraded.append(initial_input(image.to(rendered.device), view, det, config.carm_p > 0))
    clean = _crop(rendered, m)
    return HeldOut(poses, clean, torch.cat(degraded).to(clean))


@torch.no_grad()
def _errors(model: PoseRegressor, images: torch.Tensor, true: torch.Tensor, config: TrainConfig, points) -> dict:
    """Network predictions on (n, 1, H, W) inputs against the (n, 4, 4) true poses -> error figures."""
    pred = torch.cat([model(normalize_xray(chunk, config.height)) for chunk in images.split(16)]).double()
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
    return {
        "n": len(true),
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


@torch.no_grad()
def validate(
    model: PoseRegressor, renderer: Renderer, config: TrainConfig, points: torch.Tensor, data: HeldOut | None = None
) -> dict:
    """Held-out poses (:func:`held_out`; made here when ``data`` is None) -> error figures and covariances.

    The top-level figures are on the degraded C-arm views (what the network meets in use); the same
    figures on the clean DRRs are under ``"clean"``. Each set has per-parameter mean absolute errors
    (deg / mm), median/mean mTRE and dGeo (mm), the 6x6 covariance of the C-arm parameter errors
    (alpha, beta, gamma in rad; x, y, z in mm) and the 6x6 covariance of the pose error as ROS
    orders it (camera-centre error x, y, z in world mm; rotation-vector error in world frame, rad).
    """
    data = held_out(renderer, config) if data is None else data
    model.eval()
    degraded = _errors(model, data.degraded, data.poses, config, points)
    clean = _errors(model, data.clean, data.poses, config, points)
    model.train()
    return degraded | {"images": "degraded", "clean": clean}


class DrrPool:
    """Rendered DRRs reused across steps with fresh augmentations, a few re-rendered at new poses every step.

    ``render``: (B, 4, 4) poses -> (image (B, 1, H, W), label masks (B, C, H, W) or None).
    """

    def __init__(self, render: Callable, ranges: dict, size: int, refresh: int, gen: torch.Generator, device):
        if size < 1 or not 0 <= refresh <= size:
            raise ValueError(f"pool size must be >= 1 and refresh in [0, size], got {size}, {refresh}")
        self.render, self.ranges, self.refresh, self.device = render, ranges, refresh, device
        self.poses = sample_poses(ranges, size, gen, device)
        pairs = [render(chunk) for chunk in self.poses.split(16)]
        self.images = torch.cat([p[0] for p in pairs])
        self.masks = None if pairs[0][1] is None else torch.cat([p[1] for p in pairs])
        self.rendered = size  # DRRs rendered so far
        self._oldest = 0

    def __len__(self) -> int:
        return len(self.poses)

    def batch(self, n: int, gen: torch.Generator):
        """Re-render the ``refresh`` oldest entries, then draw ``n`` at random -> (poses, images, masks)."""
        if self.refresh:
            idx = (self._oldest + torch.arange(self.refresh)) % len(self)
            self.poses[idx] = sample_poses(self.ranges, self.refresh, gen, self.device)
            image, masks = self.render(self.poses[idx])
            self.images[idx] = image
            if self.masks is not None:
                self.masks[idx] = masks
            self._oldest = int(idx[-1] + 1) % len(self)
            self.rendered += self.refresh
        pick = torch.randint(len(self), (n,), generator=gen)
        return self.poses[pick], self.images[pick], None if self.masks is None else self.masks[pick]


# --------------------------------------------------------------------------------------------
# The loop's pieces
# --------------------------------------------------------------------------------------------
def _initial_model(config: TrainConfig, out: Path, base, resume: bool, device, gen: torch.Generator):
    """The model to train and where it starts: (model, raw checkpoint dict, step, wall time so far in s).

    Resuming restores ``gen``'s state from the checkpoint, so a resumed run draws the same poses
    as an uninterrupted one.
    """
    if resume:
        ckpt = load_checkpoint(out, map_location=device)
        gen_state = ckpt.metadata.get("rng_state")
        if gen_state is not None:
            gen.set_state(gen_state)
        return ckpt.model, ckpt.raw, int(ckpt.itr or 0), float(ckpt.metadata.get("wall_time_s", 0.0))
    if base is not None:
        return load_checkpoint(base, map_location=device).model, {}, 0, 0.0
    model = PoseRegressor(
        config.model_name, config.parameterization, config.convention, config.norm_layer, config.height
    )
    return model, {}, 0, 0.0


def _fresh_batch(renderer, source: Detector, config: TrainConfig, gen, device, channels: bool):
    """Poses sampled and rendered at ``source`` now -> (poses, images, masks or None)."""
    true = sample_poses(config.ranges, config.batch_size, gen, device)
    with torch.no_grad():
        img, masks = _render_pair(renderer, true, source, channels)
    return true, img, masks


def _network_input(img: torch.Tensor, true: torch.Tensor, config: TrainConfig, gen, mu_scale: float):
    """(B, 1, H, W) DRRs at :meth:`TrainConfig.render_detector` of poses ``true`` -> the network's
    augmented, normalised input at the canonical detector."""
    valid = None
    if config.carm_p > 0:
        rng = np.random.default_rng(int(torch.randint(2**62, (), generator=gen)))
        img, valid = carm_views(img, true, config.render_detector(), config.detector(), rng, CarmAugment(),
                                config.carm_p, mu_scale)
    x = augment(minmax(img), gen, config.augment_p)
    if valid is not None:  # the filled outside is 0 after min-max: keep it so through the augmentations
        x = torch.where(valid, x, torch.zeros_like(x))
    return normalize_xray(x, config.height)


def _prepared(batch, config: TrainConfig, gen, mu_scale: float):
    """(poses, DRRs, label masks or None) at :meth:`TrainConfig.render_detector` -> (poses, network
    input, DRRs, masks)."""
    true, img, masks = batch
    return true, _network_input(img, true, config, gen, mu_scale), img, masks


def _step_losses(model, renderer, detector, config: TrainConfig, prepared) -> dict:
    """One :func:`_prepared` batch -> Eq. 24's terms (mean over the batch): ``dgeo``, and ``ncc``/``dice``
    when weighted (against the clean DRRs at the canonical ``detector``)."""
    true, x, img, masks = prepared
    pred = model(x)
    losses = {"dgeo": metrics.dgeo(true, pred, config.sdd, eps=1e-4).mean()}
    channels = masks is not None
    if config.w_ncc > 0 or channels:
        img_hat, masks_hat = _render_pair(renderer, pred, detector, channels)
        if config.w_ncc > 0:
            losses["ncc"] = (1 - similarity.mncc(img_hat, _crop(img, config.margin()))).mean()
        if channels:
            losses["dice"] = soft_dice_loss(masks_hat, _crop(masks, config.margin())).mean()
    return losses


def _total_loss(config: TrainConfig, losses: dict) -> torch.Tensor:
    """Eq. 24: the weighted sum of the terms."""
    ncc, dice = losses.get("ncc", 0.0), losses.get("dice", 0.0)
    return config.w_geo * losses["dgeo"] + config.w_ncc * ncc + config.w_dice * dice


def _descend(model, optimizer, loss: torch.Tensor, lr: float) -> None:
    """One optimiser step at ``lr``; a non-finite loss skips the update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()


@dataclass
class _Session:
    """One call of :func:`train`: what it trains, its clock, and its checkpoints."""

    volume: Volume
    config: TrainConfig
    out: Path
    base: str | Path | None
    model: PoseRegressor
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    detector: Detector
    patient_to_template: torch.Tensor
    step: int
    elapsed_before: float  # s, of the runs this one resumes
    history: list[dict]
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Wall time (s) including the resumed runs'."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def fraction(self) -> float:
        """How much of the run is done: steps or time, whichever is further along."""
        fracs = []
        if self.config.max_steps is not None:
            fracs.append(self.step / self.config.max_steps if self.config.max_steps > 0 else 1.0)
        if self.config.time_budget:
            fracs.append(self.elapsed() / self.config.time_budget)
        return max(fracs)

    def progress(self, losses: dict, loss: torch.Tensor, lr: float) -> Progress:
        done = self.fraction()
        elapsed = self.elapsed()
        eta = elapsed / done * (1 - done) if done > 0 else None
        figures = {k: float(v.detach()) for k, v in losses.items()} | {"total": float(loss.detach())}
        return Progress(self.step, self.config.max_steps, elapsed, eta, figures, lr)

    def curve_point(self, figures: dict) -> dict:
        keys = ("mtre_median_mm", "mtre_iqr_mm", "dgeo_median_mm")
        clean = {f"clean_{k}": figures["clean"][k] for k in keys}
        return {"step": self.step, "elapsed_s": self.elapsed()} | {k: figures[k] for k in keys} | clean

    def metadata(self, validation: dict | None = None, rng_state: torch.Tensor | None = None) -> dict:
        config, detector, volume = self.config, self.detector, self.volume
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
            "network": self.model.architecture,
            "network_input": FIELD_OF_VIEW_INPUT if config.carm_p > 0 else "image",
            "train_config": {k: v for k, v in asdict(config).items() if k != "ranges"},
            "base_checkpoint": str(self.base) if self.base else None,
            "steps": self.step,
            "wall_time_s": self.elapsed(),
            "patient_to_template": self.patient_to_template,
            "rng_state": self.gen.get_state() if rng_state is None else rng_state,
            "validation": validation or {},
            "validation_history": self.history,
            "written": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def write(self, validation: dict | None = None, rng_state: torch.Tensor | None = None) -> None:
        """Save the checkpoint (atomically, xvr's format plus our metadata); ``rng_state``: the pose
        generator's state the next step starts from (default: its state now)."""
        config, detector = self.config, self.detector
        bounds = ("min", "max")
        ranges = {f"{k}{m}": config.ranges[k][i] for k in ("alpha", "beta", "gamma") for i, m in enumerate(bounds)}
        ranges |= {f"t{k}{m}": config.ranges[k][i] for k in ("x", "y", "z") for i, m in enumerate(bounds)}
        xvr_config = config_from_model(
            self.model,
            delx=detector.delx,
            sdd=detector.sdd,
            orientation=detector.orientation,
            reverse_x_axis=detector.reverse_x_axis,
            batch_size=config.batch_size,
            lr=config.lr,
            **ranges,
        )
        metadata = self.metadata(validation, rng_state)
        save_checkpoint(self.out, self.model, xvr_config, metadata=metadata, optimizer=self.optimizer, itr=self.step)


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

    model, raw, step, elapsed_before = _initial_model(config, out, base, resume, device, gen)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if raw.get("optimizer_state_dict"):
        optimizer.load_state_dict(raw["optimizer_state_dict"])

    channels = bool(config.labels) and config.w_dice > 0
    renderer = Renderer(volume, labels=config.labels, label_channels=channels, device=device)
    detector = config.detector()
    points = body_points(volume, labels=config.labels)
    p2t = torch.eye(4, dtype=torch.float64) if patient_to_template is None else patient_to_template.double()
    history = list(raw.get("xvr_ros", {}).get("validation_history", []))
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        run = _Session(volume, config, out, base, model, optimizer, gen, detector, p2t, step, elapsed_before, history)
        return _run(run, renderer, channels, points, progress, cancel)
    finally:
        torch.set_num_threads(threads)


def _run(run: _Session, renderer: Renderer, channels: bool, points, progress, cancel) -> TrainResult:
    """The loop of :func:`train` from its session to its result."""
    config, gen = run.config, run.gen
    device = torch.device(config.device)
    mu_scale = float(run.volume.data.max())

    def render(poses):
        with torch.no_grad():
            return _render_pair(renderer, poses, config.render_detector(), channels)

    def produce():
        """-> (``gen``'s state before this batch, the :func:`_prepared` batch)."""
        state = gen.get_state()
        if pool is None:
            batch = _fresh_batch(renderer, config.render_detector(), config, gen, device, channels)
        else:
            batch = pool.batch(config.batch_size, gen)
        return state, _prepared(batch, config, gen, mu_scale)

    # The next batch is drawn, rendered and augmented in a worker thread while the network trains
    # on this one: only the worker touches ``gen``, so the batches are the same as without it, and a
    # checkpoint keeps the state from before the prefetched batch, so a resumed run draws it again.
    workers = ThreadPoolExecutor(1, thread_name_prefix="xvr-train-batches") if config.prefetch else None
    try:
        # The held-out views (field-of-view detection is slow) are made while the pool renders.
        data = held_out(renderer, config) if workers is None else workers.submit(held_out, renderer, config)
        pool = None
        if config.pool_size:
            pool = DrrPool(render, config.ranges, config.pool_size, config.pool_refresh, gen, device)
        data = data if workers is None else data.result()
        return _loop(run, renderer, points, data, produce, workers, progress, cancel)
    finally:
        if workers is not None:
            workers.shutdown(wait=True, cancel_futures=True)


def _loop(run: _Session, renderer, points, data: HeldOut, produce, workers, progress, cancel) -> TrainResult:
    """Steps until the budget is spent or ``cancel`` is set, then the final validation and checkpoint."""
    config, model, detector, history = run.config, run.model, run.detector, run.history
    pending = None if workers is None else workers.submit(produce)
    last_write = last_validation = time.perf_counter()
    cancelled = False
    while run.fraction() < 1.0:
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        lr = _lr(config, run.step, run.fraction())
        if pending is None:
            _, prepared = produce()
        else:
            (_, prepared), pending = pending.result(), workers.submit(produce)
        losses = _step_losses(model, renderer, detector, config, prepared)
        loss = _total_loss(config, losses)
        _descend(model, run.optimizer, loss, lr)
        run.step += 1
        if progress is not None:
            progress(run.progress(losses, loss, lr))
        if config.validation_interval and time.perf_counter() - last_validation > config.validation_interval:
            history.append(run.curve_point(validate(model, renderer, config, points, data)))
            last_validation = time.perf_counter()
        if time.perf_counter() - last_write > config.checkpoint_interval:
            run.write(rng_state=None if pending is None else pending.result()[0])
            last_write = time.perf_counter()

    validation = validate(model, renderer, config, points, data)
    history.append(run.curve_point(validation))
    run.write(validation, None if pending is None else pending.result()[0])
    return TrainResult(run.out, run.step, run.elapsed(), cancelled, validation, history)

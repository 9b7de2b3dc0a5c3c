"""Registration benchmark (``make bench``): accuracy and speed of ``register`` on X-rays as a C-arm delivers them.

Prints one ``BENCH <name> <value> <unit>`` line per figure.

Set-up (all seeded, so every run sees the same cases):

- Volume: the demo chest CT (``load_volume(*demo_ct_path())``, linear HU -> attenuation).
- Detectors: ``512`` (512 x 512 px of 0.582 mm), ``448x512`` (448 x 512 px of 0.582 mm, as
  DeepFluoro) and ``1024`` (a 1024 x 1024 px flat panel of 0.3 mm), SDD 1020 mm, each case with
  its own principal point up to 10 mm off centre.
- Targets: ``--n`` (default 20) poses per detector from the ``chest`` preset
  (``presets.sample_poses``), rendered with Siddon at full resolution through the simulator's
  image chain (``simulate.simulate_xray``: a wire or screw that is not in the CT, PSF blur,
  collimator blades (any subset, rotated, soft-edged, leaking 1-5 % with noise) or an image
  intensifier's circle or both, heel ramp, Poisson noise, gamma 0.8-1.25, saturation, burned-in
  text), delivered as 12-bit detector counts. The refinement renders with the trilinear renderer
  (another integrator on a coarser volume level: no inverse crime).
- What the method gets: the counts read through ``read_xray_image`` (the nodes' reading path:
  ``-log(I / I0)``, I0 the 99.9th percentile), the detector's intrinsics, and the initial pose:
  the truth perturbed in the C-arm frame as a pose-regression network errs
  (``simulate.perturb_poses``: rotations ±6° per axis, in-plane ±20 mm, depth ±50 mm). The
  simulator's true field of view and pose score only.
- Methods, same cases, same renderer: ``register`` with its defaults (``<size>_register``);
  without field-of-view detection (``_no_fov``, what the registration did before); with the
  simulator's true field of view handed over instead of detected (``_oracle_fov``: the old bench's
  set-up, printed once so the difference shows); with the instrument left in the similarity
  (``_no_outliers``); xvr's single-scale defaults (``_baseline_xvr``: 1/8 resolution, mNCC +
  gradNCC, no mask, no multi-start).
- End to end (``<size>_network``, issue: initial poses from the network): the same images
  registered from the pose-regression network's estimate instead of a perturbed truth
  (``register(checkpoint=...)``: field of view detected and given to the network, Eq. 26
  resampling, then the refinement), with the training benchmark's chest network
  (``bench_train.NETWORK``, or ``--network``); ``<size>_network_initial_mtre_median`` is the
  network's own error. Skipped with a note when there is no network.
- Scores: mTRE (``metrics.mtre``) on 100 voxel centres of the CT's labelled structures; SMSR =
  % of cases with mTRE < 1 mm; wall time per registration, one at a time, after a warm-up.
- ``fov_iou``: intersection over union of the detected field of view with the simulator's.

Run: ``python bench/bench_register.py [--n 20] [--quick] [--sizes 512 1024] [--skip-variants] [--per-case]
[--network PATH | --skip-network]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import xvr_ros  # noqa: F401 - first: it sets OMP_WAIT_POLICY=PASSIVE (unless set) before torch loads OpenMP
from xvr_ros.core.geometry import Detector, carm_parameters
from xvr_ros.core.io.volume import demo_ct_path, load_volume
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.io.xray_image import read_xray_image
from xvr_ros.core.metrics import mtre, smsr
from xvr_ros.core.model.checkpoint import load_checkpoint
from xvr_ros.core.register.refine import RefineResult, refine
from xvr_ros.core.register.registration import Registration, field_of_view, register
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.sim.simulate import perturb_poses, simulate_xray
from xvr_ros.core.train.presets import pose_generator, resolve_ranges, sample_poses

SDD = 1020.0
#: name -> (height, width, pixel spacing mm)
DETECTORS = {"512": (512, 512, 0.582), "448x512": (448, 512, 0.582), "1024": (1024, 1024, 0.3)}
MAX_PRINCIPAL_POINT_MM = 10.0
N_FIDUCIALS = 100
# xvr's ``register`` defaults: one scale at 1/8 resolution, no mask, no multi-start.
BASELINE = dict(
    scales=(8.0,), similarity="mncc+gncc", sigma=0.0, parameterization="euler_zxy", lr_rot=1e-2, lr_xyz=1.0,
    patience=5, threshold=1e-4, max_plateaus=2, max_iterations=500,
)


def bench(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.4g} {unit}", flush=True)


def fiducials(volume, n: int = N_FIDUCIALS, seed: int = 0) -> torch.Tensor:
    """``n`` voxel centres (world mm) inside the label map's structures, (n, 3) float64."""
    idx = torch.nonzero(volume.labels != 0)
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(rng.choice(len(idx), size=n, replace=False))
    return volume.index_to_world(idx[pick].to(torch.float64))


class Case:
    """One target: what the method gets (``xray``, ``init``) and what scores it (``true``, ``fov``)."""

    def __init__(self, xray: Xray, init: torch.Tensor, true: torch.Tensor, fov: torch.Tensor, obj: dict | None):
        self.xray, self.init, self.true, self.fov, self.object = xray, init, true, fov, obj


def make_cases(siddon: Renderer, name: str, n: int, seed: int) -> list[Case]:
    H, W, spacing = DETECTORS[name]
    rng = np.random.default_rng([seed, H, W])
    true = sample_poses(resolve_ranges("chest"), n, pose_generator(seed), dtype=torch.float64)
    init = perturb_poses(true, 6.0, 20.0, 50.0, seed=seed + 1)
    cases = []
    for i in range(n):
        x0, y0 = rng.uniform(-MAX_PRINCIPAL_POINT_MM, MAX_PRINCIPAL_POINT_MM, 2)
        det = Detector(sdd=SDD, height=H, width=W, delx=spacing, dely=spacing, x0=float(x0), y0=float(y0))
        sim = simulate_xray(siddon, true[i : i + 1], det, seed=seed + 1000 + i)
        xray = read_xray_image(sim.counts[0, 0].numpy(), sdd=SDD, pixel_spacing=spacing, x0=float(x0), y0=float(y0))
        cases.append(Case(xray, init[i : i + 1], true[i : i + 1], sim.fov, sim.params["foreign_object"][0]))
    return cases


def run(renderer, cases, points, method, label: str | None = None) -> dict:
    """Register every case with ``method``; with a ``label``, print one ``CASE`` line per case."""
    errors, seconds, cpu, iterations = [], [], [], []
    for i, c in enumerate(cases):
        t0, c0 = time.perf_counter(), time.process_time()
        result = method(renderer, c)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        refinement = getattr(result, "refinement", result)
        iterations.append(refinement.iterations)
        errors.append(float(mtre(c.true, result.pose.to(torch.float64), points)))
        if label is not None:
            print_case(label, i, c, result, points, seconds[-1])
    return {"mtre": torch.tensor(errors), "seconds": torch.tensor(seconds), "cpu_seconds": torch.tensor(cpu),
            "iterations": torch.tensor(iterations, dtype=torch.float64)}


def print_case(label: str, i: int, c: Case, result, points, seconds: float) -> None:
    """One line: start and final mTRE, the final error split into rotation, in-plane and depth
    (C-arm frame), similarity, iterations, multi-start, the scored fraction of the image."""
    pose = result.pose.to(torch.float64)
    refinement = getattr(result, "refinement", result)
    d = (carm_parameters(pose)[1] - carm_parameters(c.true)[1])[0]  # x, z in-plane, y depth
    R = c.true[0, :3, :3].T @ pose[0, :3, :3]
    rot = math.degrees(math.acos(max(-1.0, min(1.0, (float(R.trace()) - 1) / 2))))
    mask = getattr(result, "mask", None)
    scored = 1.0 if mask is None else float(mask.float().mean())
    multistart = getattr(result, "multistart_similarity", None) is not None
    print(f"CASE {label} {i:2d} start {float(mtre(c.true, c.init, points)):6.1f} mm final "
          f"{float(mtre(c.true, pose, points)):7.3f} mm | rot {rot:.3f} deg in-plane {float(d[0]):+.2f} "
          f"{float(d[2]):+.2f} depth {float(d[1]):+.2f} mm | similarity {float(refinement.similarity.max()):.4f} "
          f"{refinement.iterations} it{' multistart' if multistart else ''} scored {scored:.2f} "
          f"fov {float(c.fov.float().mean()):.2f} {seconds:.1f} s", flush=True)


def ours(renderer, c: Case, **options) -> Registration:
    return register(renderer, c.xray, init_pose=c.init, **options)


def oracle_fov(renderer, c: Case) -> Registration:
    xray = Xray(image=c.xray.image, detector=c.xray.detector, valid_mask=c.fov)
    return register(renderer, xray, init_pose=c.init, detect_fov=False)


def end_to_end(renderer, cases: list[Case], points, checkpoint, prefix: str) -> None:
    """Register every case from the network's estimate; report the network's error and the result."""
    initial = []

    def from_network(r, c: Case) -> Registration:
        result = register(r, c.xray, checkpoint=checkpoint)
        initial.append(float(mtre(c.true, result.initial_pose.to(torch.float64).cpu(), points)))
        return result

    out = run(renderer, cases, points, from_network)
    bench(f"{prefix}_initial_mtre_median", float(np.median(initial)), "mm")
    report(prefix, out)


def default_network() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import NETWORK

    return NETWORK


def baseline(renderer, c: Case) -> RefineResult:
    return refine(renderer, c.xray.image, c.xray.detector, c.init.float(), **BASELINE)


def quantiles(x: torch.Tensor) -> tuple[float, float]:
    q = torch.quantile(x.to(torch.float64), torch.tensor([0.5, 0.95], dtype=torch.float64))
    return float(q[0]), float(q[1])


def report(prefix: str, out: dict) -> None:
    m50, m95 = quantiles(out["mtre"])
    t50, t95 = quantiles(out["seconds"])
    bench(f"{prefix}_smsr", smsr(out["mtre"]), "%")
    bench(f"{prefix}_mtre_median", m50, "mm")
    bench(f"{prefix}_mtre_p95", m95, "mm")
    bench(f"{prefix}_time_median", t50, "s")
    bench(f"{prefix}_time_p95", t95, "s")
    # CPU time of all threads: unlike wall time, it does not grow when other processes share the cores.
    bench(f"{prefix}_cpu_time_median", quantiles(out["cpu_seconds"])[0], "s")
    # Of the refinement that gave the answer (a multi-start's batched iterations are not counted).
    bench(f"{prefix}_iterations_median", quantiles(out["iterations"])[0], "iterations")


def fov_iou(cases: list[Case]) -> torch.Tensor:
    ious = []
    for c in cases:
        det = field_of_view(c.xray)
        det = torch.ones_like(c.fov) if det is None else det
        ious.append(float((det & c.fov).sum() / (det | c.fov).sum()))
    return torch.tensor(ious)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="targets per detector (default 20)")
    parser.add_argument("--quick", action="store_true", help="6 targets per detector, 512 and 1024 only")
    parser.add_argument("--sizes", nargs="+", choices=list(DETECTORS), default=list(DETECTORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-variants", action="store_true",
                        help="only register's defaults and the baseline (no no-fov / oracle / no-outlier runs)")
    parser.add_argument("--per-case", action="store_true",
                        help="print a CASE line per registration with register's defaults (errors split by axis)")
    parser.add_argument("--network", type=Path, default=None,
                        help="checkpoint for the end-to-end runs (default: the training benchmark's network)")
    parser.add_argument("--skip-network", action="store_true", help="no end-to-end runs from the network")
    args = parser.parse_args()
    n, sizes = (6, ["512", "1024"]) if args.quick else (args.n, args.sizes)

    torch.manual_seed(0)
    bench("threads", torch.get_num_threads(), "threads")
    bench("omp_wait_policy_passive", float(os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"), "bool")
    # Other processes on the CPU slow every timing down: say how busy it was.
    bench("load_average_1min", os.getloadavg()[0], "processes")
    volume = load_volume(*demo_ct_path())
    renderer, siddon = Renderer(volume), Renderer(volume, method="siddon")
    points = fiducials(volume)
    checkpoint = None
    if not args.skip_network:
        path = args.network or default_network()
        if path.exists():
            checkpoint = load_checkpoint(path)
        else:
            print(f"# no network at {path}: end-to-end runs skipped (bench/bench_train.py makes it)", flush=True)
    for name in sizes:
        cases = make_cases(siddon, name, n, args.seed)
        bench(f"{name}_cases", len(cases), "targets")
        bench(f"{name}_initial_mtre_median", float(torch.stack([mtre(c.true, c.init, points) for c in cases]).median()),
              "mm")
        ious = fov_iou(cases)
        bench(f"{name}_fov_iou_median", float(ious.median()), "")
        bench(f"{name}_fov_iou_min", float(ious.min()), "")
        ours(renderer, cases[0], max_iterations=20)  # warm-up: volume levels, kernels
        report(f"{name}_register", run(renderer, cases, points, ours, name if args.per_case else None))
        if not args.skip_variants and name == sizes[0]:
            report(f"{name}_no_fov", run(renderer, cases, points, lambda r, c: ours(r, c, detect_fov=False)))
            report(f"{name}_oracle_fov", run(renderer, cases, points, oracle_fov))
            report(f"{name}_no_outliers", run(renderer, cases, points, lambda r, c: ours(r, c, mask_outliers=False)))
        if checkpoint is not None:
            end_to_end(renderer, cases, points, checkpoint, f"{name}_network")
        report(f"{name}_baseline_xvr", run(renderer, cases, points, baseline))
    bench("load_average_1min_end", os.getloadavg()[0], "processes")


if __name__ == "__main__":
    main()

"""Registration benchmark (``make bench``): accuracy and speed of ``refine`` on simulated targets.

Prints one ``BENCH <name> <value> <unit>`` line per figure.

Set-up (all seeded, so every run sees the same cases):

- Volume: the demo chest CT (``load_volume(*demo_ct_path())``, linear HU -> attenuation).
- Detector: 256 x 256 pixels of 1.0 mm, SDD 1020 mm (a 256 mm panel; ~210 mm field of view at
  the isocenter).
- Targets: ``--n`` (default 50) poses uniform in alpha ±30°, beta ±15°, gamma ±10°, x, z ±30 mm,
  y 750..950 mm (``simulate.CHEST_RANGES``), rendered with Siddon at full resolution with the
  default domain shift of ``simulate.simulate_xray`` (gamma 0.8..1.25, contrast, offset, Poisson
  noise 3e3..3e4 photons, PSF blur 0.3..1 px, a background ramp, a random collimator edge or
  rectangle, a random wire or screw that is not in the CT). The refinement renders with the
  trilinear renderer (a different integrator on a coarser volume level: no inverse crime).
- Initial poses: the truth perturbed in the C-arm frame as a pose-regression network errs
  (``simulate.perturb_poses``: rotations ±5° per axis, in-plane ±15 mm, depth ±40 mm).
- Fiducials: 100 voxel centres drawn (seed 0) from the CT's label map (anatomical structures).
- mTRE (``metrics.mtre``), SMSR = % of cases with mTRE < 1 mm, time = wall time of one
  ``refine`` call (one target at a time, after a warm-up that builds the renderer's volume
  levels).
- Baseline, in the same process: xvr's ``register`` defaults (one scale at 1/8 resolution,
  mNCC + gradNCC with no smoothing, Euler ZXY, Adam 1e-2 rad / 1.0 mm, plateau patience 5,
  threshold 1e-4, stop after 2 plateaus, at most 500 iterations), with the same renderer and
  similarity code (``baseline_xvr``: 32 px here), and the same at 64 px (``baseline_xvr_64px``:
  the image size xvr's defaults give a 512 px X-ray).

Closing the loop: the same targets and refinement started from a patient-specific network's
predictions (``registration.predict_initial_pose``: Eq. 26 resampling from this 256 px / 1 mm
detector to the network's 128 px / 2 mm canonical one, then the network) instead of perturbed
truths (``network_*`` figures). The network is ``bench_train.NETWORK``, written by the training
benchmark's accuracy run (``make bench`` runs that first); without one it is trained here with the
same settings (``--train-budget`` s, default 600). ``--network PATH`` takes any other checkpoint.

Timing: wall time per registration, one at a time, with ``OMP_WAIT_POLICY=PASSIVE`` (the
package's default, see ``xvr_ros/__init__.py``), and the CPU time next to it.

Run: ``python bench/bench_register.py [--n 50] [--skip-baseline] [--skip-network] [--network PATH]``.
"""

from __future__ import annotations

import argparse  # noqa: E402
import os
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import xvr_ros  # noqa: E402, F401 - first: it sets OMP_WAIT_POLICY=PASSIVE (unless set) before torch loads OpenMP
from xvr_ros.core.geometry import Detector  # noqa: E402
from xvr_ros.core.io.volume import demo_ct_path, load_volume  # noqa: E402
from xvr_ros.core.metrics import mtre, smsr  # noqa: E402
from xvr_ros.core.model.checkpoint import load_checkpoint  # noqa: E402
from xvr_ros.core.register.refine import auto_scales, refine  # noqa: E402
from xvr_ros.core.register.registration import predict_initial_pose  # noqa: E402
from xvr_ros.core.render.renderer import Renderer  # noqa: E402
from xvr_ros.core.sim.simulate import (  # noqa: E402
    CHEST_RANGES,
    perturb_poses,
    random_carm_poses,
    simulate_xray,
)

DETECTOR = Detector(sdd=1020.0, height=256, width=256, delx=1.0, dely=1.0)
N_FIDUCIALS = 100
# xvr's ``register`` defaults. At 1/8 of this 256 px detector it works on 32 px images; xvr's
# own figures (method.md §7) are for 512 px images, i.e. 64 px, so the bench runs both.
BASELINE = dict(
    scales=(8.0,),
    similarity="mncc+gncc",
    sigma=0.0,
    parameterization="euler_zxy",
    lr_rot=1e-2,
    lr_xyz=1.0,
    patience=5,
    threshold=1e-4,
    max_plateaus=2,
    max_iterations=500,
)


def bench(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.4g} {unit}", flush=True)


def fiducials(volume, n: int = N_FIDUCIALS, seed: int = 0) -> torch.Tensor:
    """``n`` voxel centres (world mm) inside the label map's structures, (n, 3) float64."""
    idx = torch.nonzero(volume.labels != 0)
    rng = np.random.default_rng(seed)
    pick = torch.from_numpy(rng.choice(len(idx), size=n, replace=False))
    return volume.index_to_world(idx[pick].to(torch.float64))


class Cases:
    """The benchmark's targets, initial poses and fiducials."""

    def __init__(self, n: int, seed: int = 0):
        t0 = time.perf_counter()
        self.volume = load_volume(*demo_ct_path())
        self.renderer = Renderer(self.volume)
        siddon = Renderer(self.volume, method="siddon")
        self.true = random_carm_poses(n, CHEST_RANGES, seed=seed, dtype=torch.float64)
        self.init = perturb_poses(self.true, 5.0, 15.0, 40.0, seed=seed + 1)
        self.targets = [simulate_xray(siddon, self.true[i : i + 1], DETECTOR, seed=seed + 1000 + i) for i in range(n)]
        self.points = fiducials(self.volume)
        self.setup_seconds = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.true)

    def warm_up(self, scales=None, **kwargs) -> None:
        """Build the renderer's volume levels for every scale and source distance of the cases,
        as a refinement node does once at start-up, so no registration pays for them."""
        scales = scales or auto_scales(DETECTOR)
        sources = torch.cat([self.true[:, :3, 3], self.init[:, :3, 3]]).to(torch.float32)
        for f in scales:
            det = DETECTOR.scaled(f) if f != 1 else DETECTOR
            for src in sources:
                self.renderer.level(self.renderer.level_factors(det, src[None]))
        t = self.targets[0]
        kwargs = {**kwargs, "scales": scales, "max_iterations": 20}
        refine(self.renderer, t.image, DETECTOR, self.init[:1], mask=t.valid_mask, **kwargs)

    def run(self, init: torch.Tensor | None = None, **kwargs) -> dict:
        """Refine every target from ``init`` (default: the perturbed truths), (n, 4, 4) mm."""
        init = self.init if init is None else init
        errors, seconds, cpu, iters = [], [], [], []
        for i, t in enumerate(self.targets):
            t0, c0 = time.perf_counter(), time.process_time()
            res = refine(self.renderer, t.image, DETECTOR, init[i : i + 1], mask=t.valid_mask, **kwargs)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            errors.append(float(mtre(self.true[i : i + 1], res.pose.to(torch.float64), self.points)))
            iters.append(res.iterations)
        return {
            "mtre": torch.tensor(errors),
            "seconds": torch.tensor(seconds),
            "cpu_seconds": torch.tensor(cpu),
            "iterations": torch.tensor(iters),
        }

    def initial_mtre(self, init: torch.Tensor | None = None) -> torch.Tensor:
        return mtre(self.true, self.init if init is None else init, self.points)

    def network_poses(self, checkpoint) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's (n, 4, 4) pose for every target (float64 mm) and the seconds each took."""
        poses, seconds = [], []
        for t in self.targets:
            t0 = time.perf_counter()
            poses.append(predict_initial_pose(checkpoint, t.image, DETECTOR).to(torch.float64))
            seconds.append(time.perf_counter() - t0)
        return torch.cat(poses), torch.tensor(seconds)


def network_checkpoint(path: str | None, train_budget: float):
    """The network to start from: ``path``, else the training benchmark's (trained here if absent)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import ensure_network

    path = Path(path) if path else ensure_network(train_budget)
    checkpoint = load_checkpoint(path)
    checkpoint.model.eval()
    print(f"# network: {path} ({checkpoint.itr} steps, held-out mTRE "
          f"{checkpoint.metadata.get('validation', {}).get('mtre_median_mm', float('nan')):.1f} mm)", flush=True)
    return checkpoint


def quantiles(x: torch.Tensor) -> tuple[float, float, float, float]:
    q = torch.quantile(x.to(torch.float64), torch.tensor([0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
    return tuple(float(v) for v in q)


def report_initial(prefix: str, errors: torch.Tensor) -> None:
    q25, q50, q75, _ = quantiles(errors)
    bench(f"{prefix}_mtre_median", q50, "mm")
    bench(f"{prefix}_mtre_iqr_low", q25, "mm")
    bench(f"{prefix}_mtre_iqr_high", q75, "mm")
    bench(f"{prefix}_under_10mm", float((errors < 10).double().mean() * 100), "%")


def report(prefix: str, out: dict) -> None:
    q25, q50, q75, _ = quantiles(out["mtre"])
    _, t50, _, t95 = quantiles(out["seconds"])
    bench(f"{prefix}_mtre_median", q50, "mm")
    bench(f"{prefix}_mtre_iqr_low", q25, "mm")
    bench(f"{prefix}_mtre_iqr_high", q75, "mm")
    bench(f"{prefix}_smsr", smsr(out["mtre"]), "%")
    bench(f"{prefix}_time_median", t50, "s")
    bench(f"{prefix}_time_p95", t95, "s")
    # CPU time of all threads: unlike wall time, it does not grow when other processes share the cores.
    bench(f"{prefix}_cpu_time_median", quantiles(out["cpu_seconds"])[1], "s")
    bench(f"{prefix}_iterations_median", float(out["iterations"].double().median()), "iterations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="number of targets (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the xvr-default baseline")
    parser.add_argument("--skip-network", action="store_true", help="do not start from a network's predictions")
    parser.add_argument("--network", help="checkpoint to start from (default: the training benchmark's)")
    parser.add_argument("--train-budget", type=float, default=600.0,
                        help="seconds to train the network when there is none (default 600)")
    args = parser.parse_args()

    torch.manual_seed(0)
    bench("threads", torch.get_num_threads(), "threads")
    bench("omp_wait_policy_passive", float(os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"), "bool")
    cases = Cases(args.n, args.seed)
    bench("cases", len(cases), "targets")
    bench("setup", cases.setup_seconds, "s")
    report_initial("initial", cases.initial_mtre())

    cases.warm_up()
    report("refine", cases.run())
    if not args.skip_network:
        checkpoint = network_checkpoint(args.network, args.train_budget)
        init, seconds = cases.network_poses(checkpoint)
        report_initial("network_initial", cases.initial_mtre(init))
        bench("network_predict_time_median", float(seconds.median()), "s")
        out = cases.run(init)
        report("network_refine", out)
        # Refinement only captures starts near the truth: how its outcome splits by the start.
        start = cases.initial_mtre(init)
        for lo, hi in ((0, 20), (20, 40), (40, float("inf"))):
            sel = (start >= lo) & (start < hi)
            if sel.any():
                print(f"# network starts {lo}-{hi} mm: {int(sel.sum())} targets, SMSR {smsr(out['mtre'][sel]):.0f} %, "
                      f"refined mTRE median {float(out['mtre'][sel].median()):.2f} mm", flush=True)
    if not args.skip_baseline:
        for name, factor in (("baseline_xvr", 8.0), ("baseline_xvr_64px", 4.0)):
            config = {**BASELINE, "scales": (factor,)}
            cases.warm_up(**config)
            report(name, cases.run(**config))


if __name__ == "__main__":
    main()

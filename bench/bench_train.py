"""Training benchmark (``make bench``): where a step's time goes, steps/s, and a CPU accuracy run.

Prints ``BENCH <name> <value> <unit>`` lines. The speed part times resnet18 steps (128 px, batch 8,
dGeo loss) as training ran before the DRR pool and the C-arm augmentations (``before``: every batch
rendered, clean DRRs, torch's threads), with the pool only, with today's defaults (the pool and
C-arm views, torch's threads) and with the next batch prepared in a worker thread on one torch
thread (``prefetch_1thread``, the choice for a CPU shared with other busy processes), in the same
run, and splits a step into render, C-arm augmentation and forward/backward.

The accuracy run trains a patient-specific network on the demo CT for a fixed CPU budget
(``--budget`` s, default 600) on the "chest" preset (alpha -30..30, beta -15..15, gamma -10..10 deg;
x, z -30..30, y 750..950 mm) and reports the held-out initial-pose mTRE along the way (the learning
curve), on clean DRRs and on degraded C-arm views (field of view detected, as inference does), and
at the end. ``--compare`` trains the ``before`` configuration for the same budget too. The trained
network is kept at ``NETWORK`` (``out/bench/chest_network.pth``): the registration benchmark starts
refinement from its predictions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xvr_ros.core import metrics
from xvr_ros.core.io.volume import Volume, demo_ct_path, load_volume
from xvr_ros.core.model.network import PoseRegressor, normalize_xray
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.train.augment import CarmAugment, carm_views, minmax
from xvr_ros.core.train.loop import TrainConfig, TrainResult, train
from xvr_ros.core.train.presets import resolve_ranges, sample_poses

NETWORK = Path(__file__).resolve().parent.parent / "out" / "bench" / "chest_network.pth"
#: How training ran before the pool and the C-arm views.
BEFORE = dict(pool_size=0, carm_p=0.0, prefetch=False, threads=None)


def bench(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.4g} {unit}", flush=True)


def chest_config(**kw) -> TrainConfig:
    return TrainConfig(**(dict(ranges=resolve_ranges("chest"), preset="chest", w_ncc=0.0) | kw))


def profile_step(volume: Volume, steps: int = 6) -> None:
    """Mean ms per batch of 8 at 128 px: rendering (at the grown render detector), C-arm views,
    forward and backward (resnet18)."""
    cfg = chest_config()
    det, source = cfg.detector(), cfg.render_detector()
    renderer, gen = Renderer(volume), torch.Generator().manual_seed(0)
    rng, mu = np.random.default_rng(0), float(volume.data.max())
    model = PoseRegressor(cfg.model_name, cfg.parameterization, cfg.convention, cfg.norm_layer, cfg.height).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    total = dict(render=0.0, carm=0.0, forward=0.0, backward=0.0)
    for i in range(steps + 1):
        t = [time.perf_counter()]
        true = sample_poses(cfg.ranges, cfg.batch_size, gen)
        with torch.no_grad():
            img = renderer(true, source)
        t.append(time.perf_counter())
        img, _ = carm_views(img, true, source, det, rng, CarmAugment(), cfg.carm_p, mu)
        x = normalize_xray(minmax(img), cfg.height)
        t.append(time.perf_counter())
        loss = metrics.dgeo(true, model(x), cfg.sdd, eps=1e-4).mean()
        t.append(time.perf_counter())
        opt.zero_grad()
        loss.backward()
        opt.step()
        t.append(time.perf_counter())
        if i:  # the first step warms up
            for k, a, b in zip(total, t, t[1:]):
                total[k] += b - a
    for k, v in total.items():
        bench(f"train_step_{k}_ms_resnet18_b8_128", 1000 * v / steps, "ms")


def speed(volume, tmp: Path, tag: str, steps: int = 16, **kw) -> float:
    cfg = chest_config(max_steps=steps, n_val=8, warmup_steps=1, **kw)
    times = []
    train(volume, cfg, tmp / "speed.pth", progress=lambda p: times.append(time.perf_counter()))
    rate = (len(times) - 2) / (times[-1] - times[1])  # the first step warms up
    bench(f"train_steps_per_s_resnet18_b8_128_{tag}", rate, "steps/s")
    return rate


def train_chest_network(volume: Volume, budget: float, out: Path = NETWORK, **kw) -> TrainResult:
    """The accuracy run: resnet18 on the chest preset for ``budget`` s, dGeo loss only (the NCC
    re-render halves the CPU step rate), validated five times along the way; written to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = chest_config(time_budget=budget, validation_interval=budget / 5, n_val=64, **kw)
    return train(volume, cfg, out)


def ensure_network(budget: float = 600.0) -> Path:
    """``NETWORK``, trained now (``budget`` s) when no earlier benchmark run left one."""
    if not NETWORK.exists():
        print(f"# no {NETWORK}: training it for {budget:.0f} s (the training benchmark's accuracy run)", flush=True)
        train_chest_network(load_volume(*demo_ct_path()), budget)
    return NETWORK


def report(result: TrainResult, tag: str, budget: float) -> None:
    print(f"# accuracy run {tag}: preset chest, resnet18, 128 px, batch 8, dGeo loss only, {budget:.0f} s, "
          f"{result.steps} steps; held-out mTRE median [IQR] mm, degraded C-arm views | clean DRRs")
    for p in result.history:
        print(f"#   {p['elapsed_s']:6.0f} s  step {p['step']:5d}  degraded {p['mtre_median_mm']:6.1f} "
              f"[{p['mtre_iqr_mm'][0]:.1f}, {p['mtre_iqr_mm'][1]:.1f}]  clean {p['clean_mtre_median_mm']:6.1f} "
              f"[{p['clean_mtre_iqr_mm'][0]:.1f}, {p['clean_mtre_iqr_mm'][1]:.1f}]")
    v, c = result.validation, result.validation["clean"]
    suffix = "" if tag == "default" else f"_{tag}"
    bench(f"train_cpu_steps{suffix}", result.steps, "steps")
    bench(f"train_cpu_heldout_degraded_mtre_median{suffix}", v["mtre_median_mm"], "mm")
    bench(f"train_cpu_heldout_degraded_mtre_q25{suffix}", v["mtre_iqr_mm"][0], "mm")
    bench(f"train_cpu_heldout_degraded_mtre_q75{suffix}", v["mtre_iqr_mm"][1], "mm")
    bench(f"train_cpu_heldout_mtre_median{suffix}", c["mtre_median_mm"], "mm")
    bench(f"train_cpu_heldout_mtre_q25{suffix}", c["mtre_iqr_mm"][0], "mm")
    bench(f"train_cpu_heldout_mtre_q75{suffix}", c["mtre_iqr_mm"][1], "mm")
    bench(f"train_cpu_heldout_dgeo_median{suffix}", c["dgeo_median_mm"], "mm")
    bench(f"train_cpu_degraded_over_clean{suffix}", v["mtre_median_mm"] / c["mtre_median_mm"], "x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=600.0, help="accuracy run CPU budget, s")
    parser.add_argument("--compare", action="store_true", help="also train the 'before' configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", type=Path, default=NETWORK, help="where the accuracy run's network goes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch threads {torch.get_num_threads()}", flush=True)
    volume = load_volume(*demo_ct_path())
    if not args.skip_speed:
        profile_step(volume)
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            before = speed(volume, tmp, "before", **BEFORE)
            speed(volume, tmp, "pool", carm_p=0.0, prefetch=False, threads=None)
            after = speed(volume, tmp, "default")  # the pool and C-arm views, torch's threads
            speed(volume, tmp, "prefetch_1thread", prefetch=True, threads=1)  # for a CPU shared with others
            speed(volume, tmp, "ncc_default", steps=8, w_ncc=1.0)
        bench("train_speedup_default_over_before", after / before, "x")
    if args.compare:
        before = args.out.with_name(args.out.stem + "_before.pth")
        report(train_chest_network(volume, args.budget, before, **BEFORE), "before", args.budget)
    result = train_chest_network(volume, args.budget, args.out)
    print(f"# network written to {args.out}")
    bench("train_cpu_budget", args.budget, "s")
    report(result, "default", args.budget)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

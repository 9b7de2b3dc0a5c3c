"""Training benchmark (``make bench``): speed of the self-supervised loop and a CPU accuracy run.

Prints ``BENCH <name> <value> <unit>`` lines. The accuracy run trains a patient-specific network
on the demo CT for a fixed CPU budget (``--budget`` s, default 600) on the "chest" preset
(alpha -30..30, beta -15..15, gamma -10..10 deg; x, z -30..30, y 750..950 mm) and reports the
held-out initial-pose mTRE along the way (the learning curve) and at the end. The trained network
is kept at ``NETWORK`` (``out/bench/chest_network.pth``): the registration benchmark starts
refinement from its predictions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from xvr_ros.core.io.volume import Volume, demo_ct_path, load_volume
from xvr_ros.core.train.loop import TrainConfig, TrainResult, train
from xvr_ros.core.train.presets import resolve_ranges

NETWORK = Path(__file__).resolve().parent.parent / "out" / "bench" / "chest_network.pth"


def bench(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.4g} {unit}", flush=True)


def speed(volume, tmp: Path, model_name: str, batch_size: int, w_ncc: float, steps: int = 12) -> None:
    cfg = TrainConfig(ranges=resolve_ranges("chest"), model_name=model_name, batch_size=batch_size,
                      max_steps=steps, w_ncc=w_ncc, n_val=8, warmup_steps=1)
    times = []
    train(volume, cfg, tmp / "speed.pth", progress=lambda p: times.append(time.perf_counter()))
    dt = (times[-1] - times[1]) / (len(times) - 2)  # the first step warms up
    tag = f"{model_name}_b{batch_size}{'_ncc' if w_ncc else ''}_128"
    bench(f"train_steps_per_s_{tag}", 1 / dt, "steps/s")
    bench(f"train_drr_per_s_{tag}", batch_size * (2 if w_ncc else 1) / dt, "DRR/s")


def train_chest_network(volume: Volume, budget: float, out: Path = NETWORK) -> TrainResult:
    """The accuracy run: resnet18 on the chest preset for ``budget`` s, dGeo loss only (the NCC
    re-render halves the CPU step rate), validated five times along the way; written to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(ranges=resolve_ranges("chest"), preset="chest", time_budget=budget,
                      validation_interval=budget / 5, n_val=64, w_ncc=0.0)
    return train(volume, cfg, out)


def ensure_network(budget: float = 600.0) -> Path:
    """``NETWORK``, trained now (``budget`` s) when no earlier benchmark run left one."""
    if not NETWORK.exists():
        print(f"# no {NETWORK}: training it for {budget:.0f} s (the training benchmark's accuracy run)", flush=True)
        train_chest_network(load_volume(*demo_ct_path()), budget)
    return NETWORK


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=600.0, help="accuracy run CPU budget, s")
    args = parser.parse_args()
    volume = load_volume(*demo_ct_path())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        speed(volume, tmp, "resnet34", 8, 1.0)
        speed(volume, tmp, "resnet18", 8, 1.0)
        speed(volume, tmp, "resnet18", 8, 0.0)
    result = train_chest_network(volume, args.budget)
    print(f"# network written to {NETWORK}")
    print(
        f"# accuracy run: preset chest, resnet18, 128 px, batch 8, dGeo loss only, "
        f"{args.budget:.0f} s, {result.steps} steps"
    )
    for point in result.history:
        print(
            f"#   {point['elapsed_s']:6.0f} s  step {point['step']:5d}  mTRE median {point['mtre_median_mm']:.1f} mm  "
            f"IQR [{point['mtre_iqr_mm'][0]:.1f}, {point['mtre_iqr_mm'][1]:.1f}]"
        )
    v = result.validation
    bench("train_cpu_budget", args.budget, "s")
    bench("train_cpu_steps", result.steps, "steps")
    bench("train_cpu_heldout_mtre_median", v["mtre_median_mm"], "mm")
    bench("train_cpu_heldout_mtre_q25", v["mtre_iqr_mm"][0], "mm")
    bench("train_cpu_heldout_mtre_q75", v["mtre_iqr_mm"][1], "mm")
    bench("train_cpu_heldout_dgeo_median", v["dgeo_median_mm"], "mm")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

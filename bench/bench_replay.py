"""Replay benchmark (``make bench``): a long simulated fluoroscopy bag through the nodes, end to end.

Prints ``BENCH <name> <value> <unit>`` lines, for each mode (``rate1``: the recorded timing;
``afap``: as fast as possible, each image after the previous one's answer):

- ``replay_<mode>_registered_per_s``: frames with a TF per second of replay;
- ``replay_<mode>_latency_pose_p50/p95`` and ``latency_tf_p50/p95`` (ms): image published ->
  initial pose / refined TF received;
- ``replay_<mode>_init_mtre_median``, ``ref_mtre_median`` (mm), ``smsr`` (% of registered frames
  under 1 mm), ``registered``, ``dropped`` (a newer frame arrived while a node was busy),
  ``errors`` and ``lost`` (frames).

Set-up: ``xvr-ros simulate-bag`` on the demo chest CT (``--frames``, default 100, at 256 px,
2 frames/s, seed 0: a sweep then zoomed/panned shots, a few frames in 16UC1/mono8/32FC1; no
faults), written to ``out/bench/replay_session``; the nodes as ``config/intraop.yaml`` configures
them (refiner budget 10 s), with the training benchmark's chest network (``bench_train.NETWORK``,
trained here first if absent). Per-frame tables go to ``out/bench/replay_<mode>/report.json``.

Run: ``python bench/bench_replay.py [--frames 100] [--skip-rate] [--skip-afap] [--scales 16 8 4 2 1 --tag _full]``
(with tools/env.sh).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import xvr_ros  # noqa: F401 - first: OMP_WAIT_POLICY before torch

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out" / "bench"


def bench(name: str, value, unit: str) -> None:
    print(f"BENCH {name} {float('nan') if value is None else value:.4g} {unit}", flush=True)


def report(mode: str, r) -> None:
    s = r.summary
    bench(f"replay_{mode}_frames", s["frames"], "frames")
    bench(f"replay_{mode}_registered", s["registered"], "frames")
    bench(f"replay_{mode}_rejected", s["rejected"], "frames")
    bench(f"replay_{mode}_accepted_over_2mm", s["accepted_over_2mm"], "frames")
    bench(f"replay_{mode}_rejected_below_1mm", s["rejected_below_1mm"], "frames")
    bench(f"replay_{mode}_dropped", s["dropped"], "frames")
    bench(f"replay_{mode}_errors", s["error"], "frames")
    bench(f"replay_{mode}_lost", s["lost"], "frames")
    bench(f"replay_{mode}_wall_time", s["wall_time_s"], "s")
    bench(f"replay_{mode}_registered_per_s", s["registered_per_s"], "frames/s")
    bench(f"replay_{mode}_latency_pose_p50", s["latency_pose_ms"]["median"], "ms")
    bench(f"replay_{mode}_latency_pose_p95", s["latency_pose_ms"]["p95"], "ms")
    bench(f"replay_{mode}_latency_tf_p50", s["latency_tf_ms"]["median"], "ms")
    bench(f"replay_{mode}_latency_tf_p95", s["latency_tf_ms"]["p95"], "ms")
    bench(f"replay_{mode}_init_mtre_median", s["init_mtre_mm"]["median"], "mm")
    bench(f"replay_{mode}_ref_mtre_median", s["ref_mtre_mm"]["median"], "mm")
    bench(f"replay_{mode}_ref_mtre_q75", s["ref_mtre_mm"]["q75"], "mm")
    bench(f"replay_{mode}_smsr", s["smsr_percent"], "%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--skip-rate", action="store_true", help="only the as-fast-as-possible replay")
    ap.add_argument("--skip-afap", action="store_true", help="only the recorded-rate replay")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="refiner scales (coarsest first) instead of the config's automatic choice")
    ap.add_argument("--tag", default="", help="suffix of the BENCH names and output directories")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from bench_train import ensure_network

    from xvr_ros.core.io.volume import demo_ct_path
    from xvr_ros.ros.tools.replay import replay
    from xvr_ros.ros.tools.report import format_summary
    from xvr_ros.ros.tools.simulate_bag import simulate_bag

    network = ensure_network()
    t = time.perf_counter()
    bag = simulate_bag(demo_ct_path()[0], OUT / "replay_session", frames=a.frames, size=a.size, overwrite=True)
    print(
        f"# bag: {bag.frames} frames over {bag.duration_s:.0f} s ({bag.encodings}), "
        f"made in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    bench("replay_bag_frames", bag.frames, "frames")
    bench("replay_bag_duration", bag.duration_s, "s")
    modes = [m for m, skip in (("rate1", a.skip_rate), ("afap", a.skip_afap)) if not skip]
    overrides = {"refiner": {"scales": list(a.scales)}} if a.scales else None
    for mode in modes:
        mode += a.tag
        r = replay(
            bag.path,
            out=OUT / f"replay_{mode}",
            model=network,
            fast=mode.startswith("afap"),
            node_overrides=overrides,
            echo=lambda *x: None,
        )
        for line in format_summary(r.summary):
            print(f"# {mode}: {line}", flush=True)
        report(mode, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

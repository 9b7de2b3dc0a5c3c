"""Replay benchmark (``make bench``): simulated fluoroscopy bags through the nodes, end to end.

Prints ``BENCH <name> <value> <unit>`` lines in two sections.

Session (``--skip-session`` skips it), for each mode (``rate1``: the recorded timing;
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

Tracking (``--skip-track`` skips it): continuous fluoroscopy (``simulate-bag`` continuous mode,
seed 0, ``--track-duration`` s, default 20) at each of ``--track-fps`` (default 7.5 15) frames/s
and ``--track-sizes`` (default 256 512) px, written to ``out/bench/track_<fps>fps_<size>px<tag>``,
replayed at the recorded rate with the same nodes and network. For each,
``replay_track_<fps>fps_<size>px<tag>_``:

- ``tf_fraction`` (% of the bag's frames that got a TF), ``latency_tf_p50/p95`` (ms);
- ``ref_mtre_median`` (mm, every refined result, accepted or rejected), ``accepted_mtre_median``
  (mm, frames with a TF), ``accepted_over_2mm`` (frames);
- ``recovery_frames_median/max`` (frames from a rejection to the next TF), ``rejection_episodes``,
  ``unrecovered`` (episodes the bag ended in);
- ``tracking_frames``, ``full_frames`` (results per refinement path), ``dropped``, ``rejected``.

Per-frame tables go to ``out/bench/replay_track_<fps>fps_<size>px/report.json`` and ``report.png``.

Run: ``python bench/bench_replay.py [--frames 100] [--skip-rate] [--skip-afap] [--scales 16 8 4 2 1 --tag _full]
[--skip-session] [--skip-track] [--track-fps 7.5] [--track-sizes 256] [--track-duration 20]`` (with tools/env.sh).
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


def track_report(name: str, s: dict) -> None:
    """The tracking section's BENCH lines of one replay's summary."""
    rec, paths = s["recovery_frames"], s["paths"]
    bench(f"{name}_frames", s["frames"], "frames")
    bench(f"{name}_tf_fraction", None if s["tf_fraction"] is None else 100.0 * s["tf_fraction"], "%")
    bench(f"{name}_latency_tf_p50", s["latency_tf_ms"]["median"], "ms")
    bench(f"{name}_latency_tf_p95", s["latency_tf_ms"]["p95"], "ms")
    bench(f"{name}_ref_mtre_median", s["ref_mtre_mm"]["median"], "mm")
    bench(f"{name}_accepted_mtre_median", s["accepted_mtre_mm"]["median"], "mm")
    bench(f"{name}_accepted_over_2mm", s["accepted_over_2mm"], "frames")
    bench(f"{name}_recovery_frames_median", rec["median"], "frames")
    bench(f"{name}_recovery_frames_max", rec["max"], "frames")
    bench(f"{name}_rejection_episodes", rec["episodes"], "episodes")
    bench(f"{name}_unrecovered", rec["unrecovered"], "episodes")
    bench(f"{name}_tracking_frames", paths["tracking"]["frames"], "frames")
    bench(f"{name}_full_frames", paths["full"]["frames"], "frames")
    bench(f"{name}_dropped", s["dropped"], "frames")
    bench(f"{name}_rejected", s["rejected"], "frames")


def session(a, network, overrides) -> None:
    """The session section: one bag of discrete shots, replayed at the recorded rate and/or as fast as possible."""
    from xvr_ros.core.io.volume import demo_ct_path
    from xvr_ros.ros.tools.replay import replay
    from xvr_ros.ros.tools.report import format_summary
    from xvr_ros.ros.tools.simulate_bag import simulate_bag

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


def tracking(a, network, overrides) -> None:
    """The tracking section: a continuous bag per frame rate and detector size, replayed at the recorded rate."""
    from xvr_ros.core.io.volume import demo_ct_path
    from xvr_ros.ros.tools.replay import replay
    from xvr_ros.ros.tools.report import format_summary
    from xvr_ros.ros.tools.simulate_bag import simulate_bag

    for fps in a.track_fps:
        for size in a.track_sizes:
            case = f"{fps:g}fps_{size}px"
            name = f"replay_track_{case}{a.tag}"
            t = time.perf_counter()
            bag = simulate_bag(demo_ct_path()[0], OUT / f"track_{case}{a.tag}", mode="continuous", fps=fps,
                               duration_s=a.track_duration, size=size, seed=0, overwrite=True)
            print(f"# {name}: bag of {bag.frames} frames over {bag.duration_s:.1f} s, "
                  f"made in {time.perf_counter() - t:.0f} s", flush=True)
            # Continuous fluoroscopy, collimation fixed during the run: as a user would configure it.
            fluoro = {**(overrides or {}), "pose_estimator": {"field_of_view_period": 1.0}}
            r = replay(bag.path, out=OUT / name, model=network, node_overrides=fluoro, echo=lambda *x: None)
            for line in format_summary(r.summary):
                print(f"# {name}: {line}", flush=True)
            track_report(name, r.summary)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100, help="frames of the session bag")
    ap.add_argument("--size", type=int, default=256, help="detector px of the session bag")
    ap.add_argument("--skip-rate", action="store_true", help="only the as-fast-as-possible session replay")
    ap.add_argument("--skip-afap", action="store_true", help="only the recorded-rate session replay")
    ap.add_argument("--skip-session", action="store_true", help="no session section")
    ap.add_argument("--skip-track", action="store_true", help="no tracking section")
    ap.add_argument("--track-fps", type=float, nargs="+", default=[7.5, 15.0], help="frame rates of the tracking bags")
    ap.add_argument("--track-sizes", type=int, nargs="+", default=[256, 512], help="detector px of the tracking bags")
    ap.add_argument("--track-duration", type=float, default=20.0, help="s of continuous fluoroscopy per tracking bag")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="refiner scales (coarsest first) instead of the config's automatic choice")
    ap.add_argument("--tag", default="", help="suffix of the BENCH names and output directories")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from bench_train import ensure_network

    network = ensure_network()
    overrides = {"refiner": {"scales": list(a.scales)}} if a.scales else None
    if not a.skip_session:
        session(a, network, overrides)
    if not a.skip_track:
        tracking(a, network, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())

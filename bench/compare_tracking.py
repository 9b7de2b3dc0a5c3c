"""Compare tracking options on simulated fluoroscopy runs: the tracker alone, no gate, no ROS.

Prints, per option set, the mTRE of the tracked frames (median, p95, share over 1 mm, count over
2 mm), the compute time per tracked frame (median, p95) and the renders it took. It isolates what
``TrackingOptions`` change (volume level, pyramid size, stopping rule, Hessian reuse) from the
quality gate, which ``bench_tracking.py`` adds.

Set-up (seeded): ``--runs`` continuous fluoroscopy runs of the demo chest CT (``session.plan_fluoro``
at 7.5 frames/s for ``--duration`` s, seeds 1000 + run), rendered with Siddon through the
simulator's image chain and read as 16-bit counts, every ``--stride``-th frame kept (2: a refiner
taking every other frame; 4: catching up). Each run is tracked in order from its first kept frame,
which starts at the true pose perturbed as a full registration errs (0.3 deg, 0.5 mm in-plane,
1.5 mm depth); every tracked result extends the track, as if accepted, unless it is over 5 mm off
(then the track restarts from the perturbed truth: counted). The field of view is detected on the
first frame and reused, as the refiner does. The truth scores only. One torch thread.

Run: ``python bench/compare_tracking.py --size 512 --stride 2 --runs 4 5 6 7
--variant old footprint_ratio=1.0 min_gain=0 hessian_frames=8 --variant new`` (``--variant NAME
[key=value ...]``: ``TrackingOptions`` fields over its defaults; no variant = the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch

import xvr_ros  # noqa: F401 - first: it sets OMP_WAIT_POLICY=PASSIVE (unless set) before torch loads OpenMP
from xvr_ros.core.io.volume import demo_ct_path, load_volume
from xvr_ros.core.io.xray_image import read_xray_image
from xvr_ros.core.metrics import body_points, mtre
from xvr_ros.core.register import registration
from xvr_ros.core.register.quality import TRACKING_MODEL_PATH, load_model
from xvr_ros.core.register.tracking import Tracker, TrackingOptions, track, tracking_renderer
from xvr_ros.core.register.uncertainty import carried_uncertainty
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.sim.session import plan_fluoro, render_session
from xvr_ros.core.sim.simulate import perturb_poses

RESTART_MM = 5.0
START = (0.3, 0.5, 1.5)  # deg, in-plane mm, depth mm: a full registration's error


def parse_variant(words: list[str]) -> tuple[str, dict]:
    """``NAME key=value ...`` -> (name, TrackingOptions overrides with the fields' types)."""
    name, overrides = words[0], {}
    types = {f.name: type(getattr(TrackingOptions(), f.name)) for f in dataclasses.fields(TrackingOptions)}
    for word in words[1:]:
        key, _, value = word.partition("=")
        if key not in types:
            raise SystemExit(f"unknown TrackingOptions field {key!r} (fields: {', '.join(types)})")
        if types[key] is bool and value.lower() not in ("true", "false"):
            raise SystemExit(f"{key} takes true or false, got {value!r}")
        overrides[key] = value.lower() == "true" if types[key] is bool else types[key](value)  # bool("false") is True
    return name, overrides


def track_run(renderer: Renderer, frames, points, options: TrackingOptions, covariance_scale: float) -> list[dict]:
    """Track one run's frames in order -> one record per tracked frame, scored on the pose the
    tracker gives for publishing (the filtered one with ``options.filter``; each frame's covariance
    is its Hessian carried to its pose and calibrated by ``covariance_scale``, as the refiner's
    assessment does)."""
    renderer = tracking_renderer(renderer, options)
    tracker, fov, records = Tracker(options), None, []
    for i, fr in enumerate(frames):
        d = fr.detector
        xray = read_xray_image(fr.intensity, sdd=d.sdd, pixel_spacing=(d.dely, d.delx), x0=d.x0, y0=d.y0,
                               reverse_x_axis=d.reverse_x_axis, orientation=d.orientation)
        true = fr.pose[None].to(torch.float64)
        prior, _ = tracker.prior(fr.time, xray.detector)
        if prior is None:
            start = perturb_poses(true, *START, seed=i)[0]
            tracker.accepted(fr.time, start.to(torch.float32), xray.detector, None)
            fov = registration.field_of_view(xray)
            continue
        t0 = time.perf_counter()
        reg = track(renderer, xray, prior, field_of_view=fov, hessian=tracker.hessian, options=options)
        seconds = time.perf_counter() - t0
        error = float(mtre(true, reg.pose.to(torch.float64), points)[0])
        if error >= RESTART_MM:
            records.append({"mtre": error, "seconds": seconds, "renders": reg.refinement.iterations, "restart": True})
            tracker.reset()
            continue
        covariance = carried_uncertainty(reg.uncertainty, renderer, reg.pose, covariance_scale).covariance
        pose, _ = tracker.accepted(fr.time, reg.pose[0], xray.detector, reg.uncertainty, None, covariance,
                                   renderer.isocenter)
        records.append({"mtre": float(mtre(true, pose[None], points)[0]), "seconds": seconds,
                        "renders": reg.refinement.iterations, "restart": False})
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="detector px (default 512)")
    ap.add_argument("--stride", type=int, default=2, help="track every this many-th frame (default 2)")
    ap.add_argument("--runs", type=int, nargs="+", default=[4, 5, 6, 7], help="run seeds (default 4 5 6 7)")
    ap.add_argument("--duration", type=float, default=10.0, help="s per run (default 10)")
    ap.add_argument("--variant", nargs="+", action="append", metavar="NAME [key=value]",
                    help="an option set (repeatable); default: the defaults only")
    a = ap.parse_args(argv)
    variants = [parse_variant(v) for v in (a.variant or [["defaults"]])]

    torch.set_num_threads(1)
    volume = load_volume(*demo_ct_path())
    renderer, siddon = Renderer(volume), Renderer(volume, method="siddon")
    renderer.build_levels()
    points = body_points(volume, n=100, seed=0).to(torch.float64)
    covariance_scale = load_model(TRACKING_MODEL_PATH).covariance_scale
    runs = [render_session(siddon, plan_fluoro(a.duration, size=a.size, fps=7.5, seed=1000 + r), seed=1000 + r)
            [::a.stride] for r in a.runs]
    for name, overrides in variants:
        options = dataclasses.replace(TrackingOptions(), time_budget=3600.0, **overrides)  # renders cap it
        records = [r for frames in runs for r in track_run(renderer, frames, points, options, covariance_scale)]
        e = np.array([r["mtre"] for r in records])
        ms = 1000 * np.array([r["seconds"] for r in records])
        print(f"{name}: {a.size} px, stride {a.stride}, {len(e)} tracked frames: mTRE median {np.median(e):.3f} mm, "
              f"p95 {np.percentile(e, 95):.2f} mm, over 1 mm {100 * np.mean(e > 1):.1f} %, over 2 mm "
              f"{int(np.sum(e > 2))}, restarts {sum(r['restart'] for r in records)}; "
              f"{np.median(ms):.0f} ms median, {np.percentile(ms, 95):.0f} ms p95, "
              f"renders median {np.median([r['renders'] for r in records]):.0f}, worst {e.max():.2f} mm", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

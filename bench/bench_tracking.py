"""Tracking benchmark: the core's frame-to-frame tracking on continuous fluoroscopy, every frame, no ROS.

Prints one ``BENCH <name> <value> <unit>`` line per figure. It measures what tracking costs and how
accurate it is when it keeps up; the ROS replay (``bench_replay.py``) measures what reaches TF at
the recorded rate on this CPU, where a frame that arrives during a refinement is dropped.

Set-up (seeded): a continuous fluoroscopy run of the demo chest CT (``session.plan_fluoro``: C-arm
turning at up to 4.5 deg/s, table moves, breathing, a K-wire advancing; ``--fps`` frames/s for
``--duration`` s), per ``--sizes`` detector, rendered with Siddon through the simulator's image
chain (``session.render_session``) and read as 16-bit counts through ``read_xray_image``.

What the method gets: the image, its intrinsics and the training benchmark's chest network
(``bench_train.NETWORK``), as the nodes do: a frame without a usable track is registered in full
(``register`` from the network's estimate, or the last accepted pose when it is recent and
matches better: ``other_starts``; the multi-start only when the quality gate rejects the first
refinement: ``good_enough``; as the refiner) and assessed with the full quality model; a
trackable frame (``Tracker``: within ``max_gap`` of the last accepted one) is tracked (``track``
with the tracking renderer and the track's Hessian, the first at the full registration's pose,
``track_hessian``; reusing the field of view of the track's first frame) and assessed with the
tracking model. Accepted frames extend the track, a rejection ends it (as in the refiner, a
tracked frame cut short by its time budget is rejected without ending it, and one that started
too far, ``started_far``, is rejected and the track goes on from it; one whose match fell below the
frame before, ``Tracker.match_fell``, is rejected). Every frame is processed,
one at a time, on one torch thread. The simulator's poses score only: mTRE on 100 points in the body.

Figures per case (``<fps>fps_<size>px``): the share of frames accepted, tracked and tracked-and-
accepted; the compute time per frame by path (refinement + assessment; median, p95); mTRE of the
accepted frames (median, p95, count over 2 mm).

Run: ``python bench/bench_tracking.py [--sizes 256 512] [--fps 7.5] [--duration 20] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import xvr_ros  # noqa: F401 - first: it sets OMP_WAIT_POLICY=PASSIVE (unless set) before torch loads OpenMP
from xvr_ros.core.io.volume import demo_ct_path, load_volume
from xvr_ros.core.io.xray_image import read_xray_image
from xvr_ros.core.metrics import body_points, mtre
from xvr_ros.core.model.checkpoint import load_checkpoint
from xvr_ros.core.model.inference import predict_initial_pose
from xvr_ros.core.register.quality import TRACKING_MODEL_PATH, assess_registration, load_model
from xvr_ros.core.register.registration import register
from xvr_ros.core.register.tracking import (
    Tracker,
    TrackingOptions,
    finish,
    finished,
    screen,
    similarity_gain,
    started_far,
    track,
    track_hessian,
    tracking_renderer,
    unfinished,
)
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.sim.session import plan_fluoro, render_session

HERE = Path(__file__).resolve().parent


def bench(name: str, value, unit: str) -> None:
    print(f"BENCH {name} {value:.4g} {unit}", flush=True)


def percentile(values, q) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(renderer: Renderer, checkpoint, frames, points) -> list[dict]:
    """Register or track every frame in order -> one record per frame."""
    models = {"full": load_model(), "tracking": load_model(TRACKING_MODEL_PATH)}
    options = TrackingOptions()
    tracker, fov, records = Tracker(options), None, []
    for fr in frames:
        d = fr.detector
        xray = read_xray_image(fr.intensity, sdd=d.sdd, pixel_spacing=(d.dely, d.delx), x0=d.x0, y0=d.y0,
                               reverse_x_axis=d.reverse_x_axis, orientation=d.orientation)
        t0 = time.perf_counter()
        prior, _ = tracker.prior(fr.time, xray.detector)
        if prior is not None:
            used = tracking_renderer(renderer, options)
            reg = track(used, xray, prior, field_of_view=fov, hessian=tracker.hessian, options=options)
            path = "tracking"
            gain = similarity_gain(reg)
            if started_far(reg, options) and tracker.next_far_ends(gain):  # as the refiner: the track
                tracker.far(fr.time, reg.pose[0], xray.detector, reg.uncertainty, gain=gain)  # ends, the full path runs
                prior = None
        if prior is None:
            used = renderer
            init = predict_initial_pose(checkpoint, xray.image, xray.detector)
            # As the refiner: the multi-start runs only when the gate rejects the first refinement.
            gate = lambda first: assess_registration(renderer, first, xray.image, xray.detector,  # noqa: E731
                                                     model=models["full"]).accepted
            reg = register(renderer, xray, init_pose=init, other_starts=tracker.recent_pose(fr.time, xray.detector),
                           good_enough=gate)
            path = "full"
        verdict = assess_registration(used, reg, xray.image, xray.detector, model=models[path])
        if path == "full" and verdict.accepted:  # as the refiner: finished on the tracking level
            reg, verdict = finish_accepted(tracking_renderer(renderer, options), xray, reg, verdict, models["tracking"],
                                           options)
        # As the refiner: a tracked frame cut short ("unfinished") is rejected and the track goes on from
        # the last accepted one; one tracked from too far ("far") is rejected and the track goes on from it.
        why = screen(reg, tracker) if path == "tracking" else ""
        similarity = float(reg.refinement.similarity[0])
        accepted = verdict.accepted and not why
        if accepted:
            tracker.accepted(fr.time, reg.pose[0], xray.detector, reg.uncertainty, similarity)
            if path == "full":  # as the refiner starts a track
                fov = reg.field_of_view
                if reg.uncertainty is None:  # not finished: the track's Hessian at its pose
                    tracker.use_hessian(track_hessian(tracking_renderer(renderer, options), xray, reg, options))
        elif why == "far":
            tracker.far(fr.time, reg.pose[0], xray.detector, reg.uncertainty, gain=similarity_gain(reg))
        elif why != "unfinished":
            tracker.rejected()
        seconds = time.perf_counter() - t0
        error = float(mtre(fr.pose[None], reg.pose.to(torch.float64), points)[0])
        records.append({"path": path, "accepted": accepted, "seconds": seconds, "mtre": error})
        print(f"# frame {fr.index:3d} {path:8s} {1000 * seconds:6.0f} ms  mTRE {error:6.2f} mm  "
              f"p {verdict.p_success:.3f} {'accepted' if accepted else 'rejected'}", flush=True)
    return records


def finish_accepted(renderer: Renderer, xray, reg, verdict, model, options: TrackingOptions):
    """An accepted full registration finished on the tracking level as the refiner does it
    (``Refiner._finish``) -> (registration, verdict)."""
    tracked = finish(renderer, xray, reg, options)
    judged = assess_registration(renderer, tracked, xray.image, xray.detector, model=model)
    if not judged.accepted or unfinished(tracked, options):
        return reg, verdict
    return finished(reg, tracked), judged


def report(case: str, records: list[dict]) -> None:
    n = len(records)
    tracked = [r for r in records if r["path"] == "tracking"]
    accepted = [r for r in records if r["accepted"]]
    bench(f"track_{case}_frames", n, "frames")
    bench(f"track_{case}_accepted", 100 * len(accepted) / n, "%")
    bench(f"track_{case}_tracked", 100 * len(tracked) / n, "%")
    bench(f"track_{case}_tracked_accepted", 100 * sum(r["accepted"] for r in tracked) / n, "%")
    for path in ("tracking", "full"):
        times = [1000 * r["seconds"] for r in records if r["path"] == path]
        if times:
            bench(f"track_{case}_{path}_ms_median", statistics.median(times), "ms")
            bench(f"track_{case}_{path}_ms_p95", percentile(times, 95), "ms")
    errors = [r["mtre"] for r in accepted]
    if errors:
        bench(f"track_{case}_accepted_mtre_median", statistics.median(errors), "mm")
        bench(f"track_{case}_accepted_mtre_p95", percentile(errors, 95), "mm")
    bench(f"track_{case}_accepted_over_2mm", sum(e > 2.0 for e in errors), "frames")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="detector px (default 256 512)")
    ap.add_argument("--fps", type=float, default=7.5, help="frames/s of the run (default 7.5)")
    ap.add_argument("--duration", type=float, default=20.0, help="s of fluoroscopy (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from bench_train import ensure_network

    torch.set_num_threads(1)
    volume = load_volume(*demo_ct_path())
    renderer, siddon = Renderer(volume), Renderer(volume, method="siddon")
    renderer.build_levels()  # as the refiner does when it loads the volume
    checkpoint = load_checkpoint(ensure_network())
    points = body_points(volume, n=100, seed=0).to(torch.float64)
    for size in a.sizes:
        case = f"{a.fps:g}fps_{size}px"
        frames = render_session(siddon, plan_fluoro(a.duration, size=size, fps=a.fps, seed=a.seed), seed=a.seed)
        report(case, run(renderer, checkpoint, frames, points))
    return 0


if __name__ == "__main__":
    sys.exit(main())

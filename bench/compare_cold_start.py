"""Compare ways to register the first frame of a fluoroscopy run (the cold start), no ROS.

With tracking on, an accepted full registration is finished on the tracking level (Newton steps at
64 px, ``tracking.finish``) before it is published, and its finest scale (96 px) takes most of the
cold start. This compares, per first frame, the full registration (``auto`` scales) with one that
stops a scale earlier, each followed by the finishing: time (registration, full-model assessment
and finishing), mTRE before and after the finishing, and the two quality models' ``p_success``
(the full model on the registration, the tracking model on the finished pose).

Set-up (seeded): the first frame of a continuous fluoroscopy run per seed (``session.plan_fluoro``,
as ``bench_tracking.py``), per ``--sizes`` detector, read as 16-bit counts; the initial pose is the
training benchmark's chest network's estimate (``bench_train.NETWORK``). No multi-start (it runs
only on a gate rejection). The truth scores only. One torch thread.

Run: ``python bench/compare_cold_start.py [--sizes 512 256] [--seeds 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import xvr_ros  # noqa: F401 - first: it sets OMP_WAIT_POLICY=PASSIVE (unless set) before torch loads OpenMP
from xvr_ros.core.io.volume import demo_ct_path, load_volume
from xvr_ros.core.io.xray_image import read_xray_image
from xvr_ros.core.metrics import body_points, mtre
from xvr_ros.core.model.checkpoint import load_checkpoint
from xvr_ros.core.model.inference import predict_initial_pose
from xvr_ros.core.register.quality import TRACKING_MODEL_PATH, assess_registration, load_model
from xvr_ros.core.register.refine import auto_scales
from xvr_ros.core.register.registration import register
from xvr_ros.core.register.tracking import TrackingOptions, finish, tracking_renderer
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.sim.session import plan_fluoro, render_session

HERE = Path(__file__).resolve().parent


def first_frame(siddon: Renderer, size: int, seed: int):
    """The first frame of a run -> (Xray read from its counts, true (4, 4) pose)."""
    fr = render_session(siddon, plan_fluoro(0.2, size=size, fps=7.5, seed=seed), seed=seed)[0]
    d = fr.detector
    xray = read_xray_image(fr.intensity, sdd=d.sdd, pixel_spacing=(d.dely, d.delx), x0=d.x0, y0=d.y0,
                           reverse_x_axis=d.reverse_x_axis, orientation=d.orientation)
    return xray, fr.pose


def cold_start(renderer: Renderer, xray, init, scales, models, points, truth) -> dict:
    """Register from ``init`` on ``scales``, assess with the full model, finish -> one record."""
    options = TrackingOptions()
    t0 = time.perf_counter()
    reg = register(renderer, xray, init_pose=init, multistart_offsets=(), scales=scales)
    full = assess_registration(renderer, reg, xray.image, xray.detector, model=models["full"])
    level = tracking_renderer(renderer, options)
    finished = finish(level, xray, reg, options)
    tracked = assess_registration(level, finished, xray.image, xray.detector, model=models["tracking"])
    seconds = time.perf_counter() - t0

    def error(pose):
        return float(mtre(truth[None], pose.to(torch.float64), points)[0])

    return {"seconds": seconds, "registered": error(reg.pose), "p_full": full.p_success,
            "finished": error(finished.pose), "p_tracking": tracked.p_success}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="detector px (default 512 256)")
    ap.add_argument("--seeds", type=int, default=10, help="runs (seeds 0..N-1; default 10)")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from bench_train import ensure_network

    torch.set_num_threads(1)
    volume = load_volume(*demo_ct_path())
    renderer, siddon = Renderer(volume), Renderer(volume, method="siddon")
    renderer.build_levels()
    checkpoint = load_checkpoint(ensure_network())
    models = {"full": load_model(), "tracking": load_model(TRACKING_MODEL_PATH)}
    points = body_points(volume, n=100, seed=0).to(torch.float64)
    for size in a.sizes:
        records: dict[str, list[dict]] = {"full": [], "one_scale_less": []}
        for seed in range(a.seeds):
            xray, truth = first_frame(siddon, size, seed)
            init = predict_initial_pose(checkpoint, xray.image, xray.detector)
            scales = auto_scales(xray.detector)
            for name, used in (("full", scales), ("one_scale_less", scales[:-1])):
                r = cold_start(renderer, xray, init, used, models, points, truth)
                records[name].append(r)
                print(f"# {size} px seed {seed} {name:14s} {r['seconds']:5.2f} s  registered {r['registered']:5.2f} mm "
                      f"(full model p {r['p_full']:.2f})  finished {r['finished']:5.2f} mm "
                      f"(tracking model p {r['p_tracking']:.2f})", flush=True)
        for name, rs in records.items():
            for key, unit in (("seconds", "s"), ("registered", "mm"), ("finished", "mm")):
                value = statistics.median(r[key] for r in rs)
                print(f"BENCH cold_start_{size}px_{name}_{key}_median {value:.4g} {unit}", flush=True)
            print(f"BENCH cold_start_{size}px_{name}_finished_max {max(r['finished'] for r in rs):.4g} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())

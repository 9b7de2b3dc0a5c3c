"""End-to-end latency benchmark (``make bench``): the three nodes in this process, X-rays in over
ROS 2, initial pose and TF out.

Prints ``BENCH <name> <value> <unit>`` lines:

- ``e2e_image_to_pose_p50/p95`` (ms): image published -> ``xray/initial_pose`` received;
- ``e2e_image_to_tf_p50/p95`` (ms): image published -> the refined ``/tf`` transform received;
- ``e2e_frames_per_s``: frames registered per second when each frame waits for its TF (one at a
  time, as ``make demo`` streams);
- ``e2e_refine_iterations_median``: iterations per frame (context for the TF latency).

Set-up: the demo chest CT; nodes from ``config/intraop.yaml`` (``bringup.running``, in-process,
one MultiThreadedExecutor; the refiner's ``time_budget`` as configured, 10 s); a network made
through the Finetune action with a few steps only (``--steps``, default 5; the config's
architecture, resnet18 at 128 px on CPU), finetuned from the model ``make demo`` leaves in
``out/demo/models`` when it exists (``--base``), else de novo. The pose latency depends on the
architecture, not on accuracy. The TF latency does depend on accuracy: it is set by how many
iterations the refinement runs, and a barely trained (de novo) network puts the initial pose so
far off (~1 m) that the refinement stops early in a wrong optimum (few iterations, a short,
meaningless latency); from the demo's model (initial mTRE tens of mm) the refinement does its
real work. The ``#`` line says which one was used; ``e2e_refine_iterations_median`` is printed.
Frames: ``--frames`` (20) simulated chest X-rays at 256 x 256 px (1 mm, SDD 1020 mm) with the
demo's domain shift, as mono16 intensity; the first frame (warm-up: renderer levels, first
inference) is excluded from the percentiles and reported separately.

Run: ``python bench/bench_e2e.py [--frames 20] [--steps 5] [--size 256]`` (with tools/env.sh).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


DEMO_MODEL = Path(__file__).resolve().parents[1] / "out" / "demo" / "models" / "chest_demo.pth"


def bench(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.4g} {unit}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5, help="Finetune max_steps (latency does not need accuracy)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", default=str(DEMO_MODEL),
                    help="checkpoint to finetune from (default: the model `make demo` leaves, when it exists; "
                         "'' = de novo): the TF latency depends on how far the initial poses are")
    a = ap.parse_args(argv)

    import rclpy

    from xvr_ros.action import Finetune
    from xvr_ros.core.volume import demo_ct_path, load_volume
    from xvr_ros.demo import WAIT, DemoClient, _isolated_ros_default, simulate_frames
    from xvr_ros.ros.bringup import running

    ct, mask = demo_ct_path()
    volume = load_volume(ct, mask)
    frames = simulate_frames(volume, a.frames + 1, a.size, device=a.device, seed=7, zoom=False)
    tmp = Path(tempfile.mkdtemp(prefix="xvr_bench_e2e_"))
    overrides = {"model_manager": dict(models_dir=str(tmp / "models"), model="", validation_poses=8, use_ncc=False)}

    _isolated_ros_default()
    context = rclpy.Context()
    rclpy.init(context=context)
    client = None
    try:
        with running(device=a.device, overrides=overrides, context=context) as nodes:
            refiner = next(n for n in nodes if n.get_name() == "refiner")
            source_frame = refiner.get_parameter("source_frame").value
            budget = refiner.get_parameter("time_budget").value
            client = DemoClient(context, name="xvr_bench_client")
            if not client.wait_subscribed(30.0):
                print("bench_e2e: the nodes did not come up", file=sys.stderr)
                return 1
            mark = client.diag_mark()
            base = a.base if a.base and Path(a.base).is_file() else ""
            result, message = client.run_finetune(Finetune.Goal(
                volume_path=str(ct), preset="chest", max_steps=a.steps, output_name="bench", device=a.device,
                base_checkpoint=base))
            if result is None or not result.success:
                print(f"bench_e2e: finetune failed: {message}", file=sys.stderr)
                return 1
            if not client.wait_ready(mark):
                print("bench_e2e: nodes not ready after the finetune", file=sys.stderr)
                return 1
            lat_pose, lat_tf, iters, lost = [], [], [], 0
            t_loop = None
            for i, fr in enumerate(frames):
                if i == 1:
                    t_loop = time.perf_counter()
                key, t_pub = client.publish(fr.intensity, fr.detector, source_frame)
                pose = client.wait("pose", key, WAIT)
                tf = client.wait("tf", key, WAIT + budget) if pose else None
                res = client.wait("result", key, 5.0) if tf else None
                if i == 0:
                    if pose and tf:
                        bench("e2e_first_frame_image_to_tf", 1e3 * (tf[0] - t_pub), "ms")
                    continue
                if not (pose and tf):
                    lost += 1
                    continue
                lat_pose.append(1e3 * (pose[0] - t_pub))
                lat_tf.append(1e3 * (tf[0] - t_pub))
                if res:
                    iters.append(res[1].iterations)
            loop = time.perf_counter() - t_loop
    finally:
        if client is not None:
            client.close()
        rclpy.try_shutdown(context=context)

    if not lat_tf:
        print("bench_e2e: no frame produced a TF", file=sys.stderr)
        return 1
    origin = f"finetuned {result.steps} steps from {base}" if base else f"trained de novo {result.steps} steps"
    print(f"# {len(lat_tf)} frames of {a.size}x{a.size} px; network {origin} (held-out mTRE "
          f"{result.mtre_median * 1e3:.0f} mm); refiner budget {budget:g} s; lost {lost}")
    bench("e2e_image_to_pose_p50", float(np.percentile(lat_pose, 50)), "ms")
    bench("e2e_image_to_pose_p95", float(np.percentile(lat_pose, 95)), "ms")
    bench("e2e_image_to_tf_p50", float(np.percentile(lat_tf, 50)), "ms")
    bench("e2e_image_to_tf_p95", float(np.percentile(lat_tf, 95)), "ms")
    bench("e2e_frames_per_s", len(lat_tf) / loop, "frames/s")
    if iters:
        bench("e2e_refine_iterations_median", float(np.median(iters)), "iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: DRRs of the bundled chest CT at a few C-arm poses, with timings and accuracy.

Later issues turn this into the full intraoperative pipeline (nodes, finetuning, refinement).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.render import Renderer, relative_rms_error
from xvr_ros.core.volume import demo_ct_path, load_volume
from xvr_ros.core.xray import save_png

VIEWS = {  # name: (alpha, beta, gamma) degrees, (x, y, z) mm
    "ap": ((0.0, 0.0, 0.0), (0.0, 850.0, 0.0)),
    "lateral": ((90.0, 0.0, 0.0), (0.0, 850.0, 0.0)),
    "lao30_cra15": ((30.0, 15.0, 0.0), (0.0, 850.0, 0.0)),
    "rao20_cau10_offset": ((-20.0, -10.0, 5.0), (20.0, 800.0, -30.0)),
}


def run_demo(out: Path, device: str = "cpu") -> int:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ct_path, mask_path = demo_ct_path()
    volume = load_volume(ct_path, mask_path)
    print(f"volume {ct_path.name}: {tuple(volume.shape)} voxels of {[round(s, 3) for s in volume.spacing.tolist()]} mm "
          f"(loaded in {time.perf_counter() - t0:.1f} s)")
    detector = Detector(sdd=1020.0, height=256, width=256, delx=1.0, dely=1.0)
    fast = Renderer(volume, device=device)
    exact = Renderer(volume, method="siddon", device=device)

    print(f"\n{'view':<20} {'trilinear ms':>13} {'siddon ms':>10} {'rel. RMS diff':>14}")
    for name, (angles, xyz) in VIEWS.items():
        pose = carm_pose(torch.tensor([angles]), torch.tensor([xyz]), degrees=True)
        with torch.no_grad():
            fast(pose, detector)  # first call builds the volume level for this footprint
            t = time.perf_counter()
            img = fast(pose, detector)
            t_fast = time.perf_counter() - t
            t = time.perf_counter()
            ref = exact(pose, detector)
            t_exact = time.perf_counter() - t
        err = float(relative_rms_error(img, ref)[0])
        save_png(out / f"{name}_trilinear.png", img[0, 0])
        save_png(out / f"{name}_siddon.png", ref[0, 0])
        print(f"{name:<20} {1e3 * t_fast:>13.1f} {1e3 * t_exact:>10.1f} {100 * err:>13.2f}%")
    print(f"\nwrote {2 * len(VIEWS)} PNGs to {out}/ in {time.perf_counter() - t0:.1f} s")
    return 0

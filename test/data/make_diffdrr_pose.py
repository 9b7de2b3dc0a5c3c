"""Write diffdrr_pose.npz: diffdrr.pose reference outputs for test_rotations.py's parity tests.

Run in a scratch venv outside the repository (diffdrr is not a dependency of xvr_ros):

    python3 -m venv /tmp/ddvenv
    /tmp/ddvenv/bin/pip install torch==2.13.0
    /tmp/ddvenv/bin/pip install --no-deps diffdrr==0.6.1 einops fastcore roma torchio scipy pandas nibabel numpy
    /tmp/ddvenv/bin/python test/data/make_diffdrr_pose.py test/data/diffdrr_pose.npz

Self-contained (numpy, torch, diffdrr): the inputs are drawn here with the seeds the tests use
and stored next to diffdrr's outputs, so the tests compare against exactly these inputs.
"""

import math
import sys

import diffdrr
import numpy as np
import torch
from diffdrr import pose

# Our parameterisation -> (diffdrr's name, trailing shape); so3_log is diffdrr's axis_angle.
CONVERT = {
    "axis_angle": ("axis_angle", (3,)),
    "euler_angles": ("euler_angles", (3,)),
    "quaternion": ("quaternion", (4,)),
    "quaternion_adjugate": ("quaternion_adjugate", (10,)),
    "rotation_6d": ("rotation_6d", (6,)),
    "rotation_9d": ("rotation_9d", (9,)),
    "so3_log": ("axis_angle", (3,)),
}


def random_twists(n, seed, min_angle):
    """(n, 6) twists [v, omega], angles uniform in [min_angle, pi - 1e-3) (as test_rotations.random_twists)."""
    rng = np.random.default_rng(seed)
    angles = torch.from_numpy(rng.uniform(min_angle, math.pi - 1e-3, size=(n, 1)))
    axes = np.random.default_rng(seed).normal(size=(n, 3))
    omega = torch.from_numpy(axes / np.linalg.norm(axes, axis=1, keepdims=True)) * angles
    v = torch.from_numpy(rng.normal(scale=50.0, size=(n, 3)))
    return torch.cat([v, omega], dim=-1)


def main(out: str) -> None:
    arrays = {"versions": np.array(f"diffdrr {diffdrr.__version__}, torch {torch.__version__}")}
    for ours, (theirs, trailing) in CONVERT.items():
        # float32: diffdrr's adjugate path only supports the default dtype.
        x = torch.randn(8, *trailing, generator=torch.Generator().manual_seed(24))
        T = pose.convert(x, torch.zeros(8, 3), parameterization=theirs, convention="ZXY").matrix
        arrays[f"convert_{ours}_x"] = x.numpy()
        arrays[f"convert_{ours}_matrix"] = T[..., :3, :3].numpy()
    # pytorch3d's se3_exp (inside diffdrr) clamps the angle at 0.01 in V: only exact above it.
    xi = random_twists(10, seed=25, min_angle=0.01)
    arrays["se3_xi"] = xi.numpy()
    arrays["se3_matrix"] = pose.convert(xi[:, 3:], xi[:, :3], parameterization="se3_log_map").matrix.numpy()
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])

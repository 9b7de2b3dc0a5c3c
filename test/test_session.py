"""Tests for xvr_ros.core.sim.session: the simulated fluoroscopy session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_render import phantom
from test_train import blobs

from xvr_ros.core.geometry import carm_parameters
from xvr_ros.core.sim.session import (
    I0,
    detectors,
    encode_counts,
    plan_session,
    render_session,
)
from xvr_ros.core.train.presets import PRESETS

CHEST_RANGES = PRESETS["chest"]


def test_plan_sweep_then_zoomed_shots():
    frames = plan_session(21, size=64, fps=4.0, seed=3)
    assert [f.index for f in frames] == list(range(21))
    times = np.array([f.time for f in frames])
    assert times[0] == 0.0 and (np.diff(times) > 0).all()
    sweep = [f for f in frames if f.segment == "sweep"]
    shots = [f for f in frames if f.segment != "sweep"]
    assert len(sweep) == 11 and len(shots) == 10
    assert np.allclose(np.diff([f.time for f in sweep]), 0.25)  # the sweep runs at fps
    # Between bursts the C-arm is repositioned for 2-5 s; inside a burst frames are 1/fps apart.
    gaps = np.diff([f.time for f in frames[10:]])
    assert ((np.isclose(gaps, 0.25)) | ((gaps >= 2.0) & (gaps <= 5.0))).all() and (gaps >= 2.0).any()
    assert {f.tag for f in sweep} == {"std"} and {f.tag for f in shots} == {"zoom"}
    std, zoom = detectors(64)["std"], detectors(64)["zoom"]
    assert sweep[0].detector == std and shots[0].detector == zoom
    assert zoom.delx < std.delx and zoom.height < std.height and (zoom.x0, zoom.y0) != (0.0, 0.0)
    # The sweep turns from RAO to LAO; every pose stays in the chest ranges a network is trained on.
    angles, xyz = carm_parameters(torch.stack([f.pose for f in frames]))
    angles = torch.rad2deg(angles)
    assert float(angles[10, 0] - angles[0, 0]) > 30.0
    for i, key in enumerate(("alpha", "beta", "gamma")):
        assert (
            CHEST_RANGES[key][0] - 1e-6 <= float(angles[:, i].min())
            and float(angles[:, i].max()) <= CHEST_RANGES[key][1] + 1e-6
        )
    for i, key in enumerate(("x", "y", "z")):
        assert (
            CHEST_RANGES[key][0] - 1e-6 <= float(xyz[:, i].min())
            and float(xyz[:, i].max()) <= CHEST_RANGES[key][1] + 1e-6
        )


def test_plan_is_seeded_and_jittered():
    a, b, c = plan_session(8, seed=1), plan_session(8, seed=1), plan_session(8, seed=2)
    assert all(torch.equal(x.pose, y.pose) and x.time == y.time for x, y in zip(a, b))
    assert not all(torch.equal(x.pose, y.pose) for x, y in zip(a, c))
    assert plan_session(1)[0].segment == "sweep"
    with pytest.raises(ValueError, match="at least one frame"):
        plan_session(0)
    with pytest.raises(ValueError, match="fps"):
        plan_session(4, fps=0.0)


def test_encodings():
    counts = I0 * np.exp(-np.array([[0.0, 1.0], [2.0, 2.5]]))
    m16 = encode_counts(counts, "mono16")
    assert m16.dtype == np.uint16 and int(m16[0, 0]) == round(I0)
    m8 = encode_counts(counts, "mono8")
    assert m8.dtype == np.uint8 and int(m8[0, 0]) == 255
    f32 = encode_counts(counts, "32FC1")
    assert (
        f32.dtype == np.float32
        and f32[0, 0] == pytest.approx(1.0)
        and f32[1, 1] == pytest.approx(np.exp(-2.5), rel=1e-5)
    )
    with pytest.raises(ValueError, match="yuv422"):
        encode_counts(counts, "yuv422")


def test_render_session_on_a_phantom():
    vol = phantom(shape=(30, 30, 30), spacing=(2.0, 2.0, 2.0), fn=blobs)
    frames = render_session(vol, plan_session(3, size=32, seed=0), seed=0)
    for f in frames:
        assert f.intensity.shape == f.detector.shape
        assert np.isfinite(f.intensity).all() and f.intensity.min() >= 0 and f.intensity.max() <= I0 * (1 + 1e-9)
        assert f.intensity.min() < 0.5 * I0  # the phantom attenuates
    again = render_session(vol, plan_session(3, size=32, seed=0), seed=0)
    assert all(np.array_equal(a.intensity, b.intensity) for a, b in zip(frames, again))

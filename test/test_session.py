"""Tests for xvr_ros.core.sim.session: the simulated fluoroscopy session."""

from __future__ import annotations

import dataclasses

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
    fluoro_motion,
    plan_fluoro,
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


# --------------------------------------------------------------------------------------------
# continuous fluoroscopy
# --------------------------------------------------------------------------------------------
def rotation_deg(Ra: torch.Tensor, Rb: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations (..., 3, 3), degrees."""
    cos = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


@pytest.mark.parametrize("seed", range(4))
def test_fluoro_run_moves_smoothly_within_limits(seed):
    fps = 7.5
    frames = plan_fluoro(20.0, size=64, fps=fps, seed=seed)
    assert len(frames) == 150 and [f.index for f in frames] == list(range(150))
    assert [f.time for f in frames] == [i / fps for i in range(150)]
    assert {f.segment for f in frames} == {"fluoro"} and {f.run for f in frames} == {0}
    assert {f.detector for f in frames} == {detectors(64)["std"]}, "one detector: no zoom in the middle of a run"
    poses = torch.stack([f.pose for f in frames])
    # The C-arm turns, never faster than 5 deg/s from one frame to the next.
    speed = rotation_deg(poses[:-1, :3, :3], poses[1:, :3, :3]) * fps
    assert float(speed.max()) <= 5.0 and float(speed.max()) > 1.5
    assert float(rotation_deg(poses[:1, :3, :3], poses[:, :3, :3]).max()) > 5.0
    angles, xyz = carm_parameters(poses, degrees=True)
    for i, key in enumerate(("alpha", "beta", "gamma", "x", "y", "z")):
        v = angles[:, i] if i < 3 else xyz[:, i - 3]
        assert CHEST_RANGES[key][0] <= float(v.min()) and float(v.max()) <= CHEST_RANGES[key][1], key

    m = fluoro_motion(np.array([f.time for f in frames]), seed)
    # Patient motion is the C-arm's opposite in the volume frame: the source is R @ xyz - (table + breathing).
    R = poses[:, :3, :3].numpy()
    source = np.einsum("nij,nj->ni", R, m.carm_mm) - m.table_mm - m.breathing_mm
    np.testing.assert_allclose(poses[:, :3, 3].numpy(), source, atol=1e-6)
    # Breathing: a few mm towards the feet and a little anterior at 0.2-0.3 Hz (4-6 breaths in 20 s).
    b = m.breathing_mm
    assert 2.9 <= np.ptp(b[:, 2]) <= 6.0 and b[:, 2].max() <= 0.0 and 0.4 <= np.ptp(b[:, 1]) <= 1.5
    assert np.all(b[:, 0] == 0.0) and np.all(b[:, 1] * b[:, 2] <= 0.0)
    half = b[:, 2] < (b[:, 2].min() / 2)
    assert 3 <= int((half[1:] & ~half[:-1]).sum()) <= 7
    # Table: a few mm/s in phases, within its range; still between the moves.
    table_speed = np.linalg.norm(np.diff(m.table_mm, axis=0), axis=1) * fps
    assert table_speed.max() <= 5.0 and (table_speed < 1e-9).mean() > 0.2
    assert np.abs(m.table_mm[:, 0]).max() <= 12.0 and np.abs(m.table_mm[:, 2]).max() <= 15.0


def test_fluoro_wire_advances_through_the_field():
    fps = 7.5
    frames = plan_fluoro(20.0, size=64, fps=fps, seed=1)
    ends = np.array([[f.instrument.p0, f.instrument.p1] for f in frames])
    axis = ends[:, 1] - ends[:, 0]
    # The same wire: one length and direction, its tip advancing along its axis, never back, at <= 3 mm/s.
    np.testing.assert_allclose(np.linalg.norm(axis, axis=1), np.linalg.norm(axis[0]), rtol=1e-9)
    unit = axis[0] / np.linalg.norm(axis[0])
    np.testing.assert_allclose(axis / np.linalg.norm(axis, axis=1, keepdims=True), np.tile(unit, (len(frames), 1)),
                               atol=1e-9)
    step = np.diff(ends[:, 1], axis=0) @ unit
    np.testing.assert_allclose(np.diff(ends[:, 1], axis=0), step[:, None] * unit, atol=1e-9)
    assert step.min() >= -1e-12 and step.max() * fps <= 3.0 and step.sum() > 5.0
    # In the image the tip stays in the field and moves a fraction of a pixel per frame.
    det = frames[0].detector
    uv = torch.cat([det.project(f.pose[None], torch.tensor(ends[i, 1:])[None]) for i, f in enumerate(frames)])[:, 0]
    assert ((uv >= 0) & (uv <= 64)).all()
    assert float((uv[1:] - uv[:-1]).norm(dim=-1).max()) < 1.0
    assert float((uv - uv[0]).norm(dim=-1).max()) > 2.0


def test_fluoro_plan_is_seeded_and_checked():
    a, b, c = plan_fluoro(2.0, 32, 15.0, 4), plan_fluoro(2.0, 32, 15.0, 4), plan_fluoro(2.0, 32, 15.0, 5)
    assert len(a) == 30 and all(torch.equal(x.pose, y.pose) and x.instrument == y.instrument for x, y in zip(a, b))
    assert not torch.equal(a[0].pose, c[0].pose)
    zoomed = plan_fluoro(2.0, 32, 7.5, 4, zoom_at_s=1.0)
    assert [f.tag for f in zoomed] == ["std"] * 8 + ["zoom"] * 7 and [f.run for f in zoomed] == [0] * 8 + [1] * 7
    for bad, match in (((0.0,), "duration"), ((1.0, 32, 0.0), "fps"), ((0.01, 32, 7.5), "not one frame")):
        with pytest.raises(ValueError, match=match):
            plan_fluoro(*bad)


def test_fluoro_run_keeps_its_collimation_and_changes_its_noise():
    vol = phantom(shape=(30, 30, 30), spacing=(2.0, 2.0, 2.0), fn=blobs)
    frame = plan_fluoro(1.0, size=48, fps=2.0, seed=0)[0]
    # The same view twice in one run differs by quantum noise alone; as independent shots (no run) the
    # collimation, exposure, gamma and text differ too.
    again = dataclasses.replace(frame, index=1)
    run = render_session(vol, [frame, again], seed=0)
    shots = render_session(vol, [dataclasses.replace(f, run=None) for f in (frame, again)], seed=0)
    noise = np.abs(run[0].intensity - run[1].intensity)
    assert noise.mean() > 0
    assert noise.mean() < 0.5 * np.abs(shots[0].intensity - shots[1].intensity).mean()
    # Noise is unbiased: averaged over the field, the two frames agree to well under the noise.
    assert abs(run[0].intensity.mean() - run[1].intensity.mean()) < 0.1 * noise.mean()

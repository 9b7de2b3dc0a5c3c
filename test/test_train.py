import threading
from dataclasses import replace

import pytest
import torch
from test_render import phantom

from xvr_ros.core.geometry import carm_parameters
from xvr_ros.core.model.checkpoint import load_checkpoint
from xvr_ros.core.model.inference import FIELD_OF_VIEW_INPUT, canonical_detector, predict_initial_pose
from xvr_ros.core.train.augment import augment
from xvr_ros.core.train.loop import DrrPool, TrainConfig, train
from xvr_ros.core.train.presets import PRESETS, resolve_ranges, sample_poses

RANGES = dict(alpha=(-20, 20), beta=(-10, 10), gamma=(-5, 5), x=(-10, 10), y=(500, 600), z=(-10, 10))


def blobs(x, y, z):
    return (
        torch.exp(-((x - 10) ** 2 + y**2 + (z + 5) ** 2) / 150)
        + 0.6 * torch.exp(-((x + 15) ** 2 + (y - 5) ** 2 + (z - 12) ** 2) / 60)
        + 0.3 * ((x.abs() < 20) & (y.abs() < 15) & (z.abs() < 25)).double()
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def volume():
    return phantom(shape=(40, 36, 48), spacing=(1.5, 1.5, 1.5), fn=blobs)


def config(**kw):
    base = dict(
        ranges=RANGES, height=32, delx=8.0, sdd=1000.0, batch_size=4, lr=1e-3, warmup_steps=5, n_val=32, augment_p=0.0,
        carm_p=0.0, pool_size=0,
    )
    return TrainConfig(**(base | kw))


def test_sample_poses_within_ranges():
    T = sample_poses(resolve_ranges("chest"), 500, torch.Generator().manual_seed(0))
    angles, xyz = carm_parameters(T.double(), degrees=True)
    params = torch.cat([angles, xyz], -1)
    for i, name in enumerate(("alpha", "beta", "gamma", "x", "y", "z")):
        lo, hi = PRESETS["chest"][name]
        assert params[:, i].min() >= lo - 1e-3 and params[:, i].max() <= hi + 1e-3
        assert params[:, i].max() - params[:, i].min() > 0.8 * (hi - lo)  # covers the range


def test_resolve_ranges_errors():
    with pytest.raises(ValueError, match="preset"):
        resolve_ranges("lung")
    with pytest.raises(ValueError, match="missing"):
        resolve_ranges(None, dict(alpha=(0, 1)))
    with pytest.raises(ValueError, match="lo <= hi"):
        resolve_ranges("chest", dict(y=(900, 800)))
    assert resolve_ranges("chest", dict(y=(800, 900)))["y"] == (800.0, 900.0)


def test_augment_is_intensity_only():
    img = torch.zeros(4, 1, 32, 32)
    img[:, :, 8:24, 12:20] = 1.0
    out = augment(img, torch.Generator().manual_seed(0), p=1.0)
    assert out.shape == img.shape and torch.isfinite(out).all()
    assert not torch.equal(out, img)
    # No geometric change: the bright block stays where it was (its centroid doesn't move).
    w = out.clamp(min=0) - out.clamp(min=0).flatten(1).median(1).values.view(-1, 1, 1, 1)
    rows = (w.clamp(min=0).sum(-1).squeeze(1) * torch.arange(32)).sum(-1) / w.clamp(min=0).sum((-1, -2)).squeeze(1)
    assert (rows - 15.5).abs().max() < 3


def test_training_reduces_pose_error(volume, tmp_path):
    before = train(volume, config(max_steps=0), tmp_path / "m0.pt").validation
    result = train(volume, config(max_steps=60), tmp_path / "m.pt")
    assert result.steps == 60 and not result.cancelled
    after = result.validation
    assert after["mtre_median_mm"] < 0.5 * before["mtre_median_mm"], (before["mtre_median_mm"], after["mtre_median_mm"])
    assert after["dgeo_median_mm"] < before["dgeo_median_mm"]
    assert after["clean"]["mtre_median_mm"] < 0.5 * before["clean"]["mtre_median_mm"]
    meta = load_checkpoint(result.path).metadata
    assert meta["volume"]["sha256"] == volume.sha256 and meta["steps"] == 60
    assert torch.tensor(meta["validation"]["carm_covariance"]).shape == (6, 6)
    assert torch.tensor(meta["validation"]["pose_covariance"]).shape == (6, 6)
    assert meta["ranges"]["y"] == [500.0, 600.0]


def test_cancel_saves_and_resume_matches_uninterrupted(volume, tmp_path):
    cfg = config(max_steps=8, w_ncc=0.0)
    straight = train(volume, cfg, tmp_path / "a.pt")

    cancel = threading.Event()

    def stop_at_three(p):
        if p.step == 3:
            cancel.set()

    first = train(volume, config(max_steps=8, w_ncc=0.0), tmp_path / "b.pt", progress=stop_at_three, cancel=cancel)
    assert first.cancelled and first.steps == 3
    assert load_checkpoint(tmp_path / "b.pt").itr == 3  # nothing learned is lost
    resumed = train(volume, config(max_steps=8, w_ncc=0.0), tmp_path / "b.pt", resume=True)
    assert resumed.steps == 8
    a = load_checkpoint(straight.path).model.state_dict()
    b = load_checkpoint(resumed.path).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_training_must_be_bounded(volume, tmp_path):
    with pytest.raises(ValueError, match="bounded"):
        train(volume, config(), tmp_path / "x.pt")


def test_pool_is_reused_and_refreshed():
    calls = []

    def render(poses):
        calls.append(len(poses))
        return poses[:, 0, 0].view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone(), None  # an "image" that names its pose

    gen = torch.Generator().manual_seed(0)
    pool = DrrPool(render, RANGES, size=6, refresh=2, gen=gen, device="cpu")
    assert len(pool) == 6 and pool.rendered == 6
    first = pool.poses.clone()
    for k in range(1, 4):
        poses, images, masks = pool.batch(5, gen)
        assert pool.rendered == 6 + 2 * k and calls[-1] == 2  # only the refreshed entries are rendered
        assert masks is None and poses.shape == (5, 4, 4)
        assert torch.equal(images[:, 0, 0, 0], poses[:, 0, 0])  # each pose comes with its own image
        assert all((pool.poses == p).all((-1, -2)).any() for p in poses)  # drawn from the pool
    changed = ~(pool.poses == first).all(-1).all(-1)
    assert changed.tolist() == [True] * 6  # three refreshes of two went round the whole pool once
    with pytest.raises(ValueError, match="refresh"):
        DrrPool(render, RANGES, size=2, refresh=3, gen=gen, device="cpu")


def test_defaults_train_a_field_of_view_network(volume, tmp_path):
    cfg = config(max_steps=3, carm_p=0.8, pool_size=8, pool_refresh=2, augment_p=0.333, n_val=8)
    result = train(volume, cfg, tmp_path / "fov.pt")
    ckpt = load_checkpoint(result.path)
    assert ckpt.metadata["network_input"] == FIELD_OF_VIEW_INPUT
    v = ckpt.metadata["validation"]
    assert v["images"] == "degraded" and v["n"] == v["clean"]["n"] == 8
    assert torch.tensor(v["pose_covariance"]).shape == (6, 6)
    assert {"clean_mtre_median_mm", "mtre_median_mm"} <= set(result.history[-1])
    # Inference at another detector (finer pixels, off-centre) with and without a given field of view.
    det = replace(canonical_detector(ckpt), height=48, width=40, delx=5.6, dely=5.6, x0=7.0, y0=-4.0)
    image = torch.rand(1, 1, 48, 40) * 3
    mask = torch.zeros(1, 1, 48, 40, dtype=torch.bool)
    mask[..., 4:40, 6:36] = True
    for m in (mask, None):
        pose = predict_initial_pose(ckpt, image, det, m)
        assert pose.shape == (1, 4, 4) and torch.isfinite(pose).all()
    # The network sees only the field of view: what lies outside it (a blade, text) changes nothing.
    outside = torch.where(mask, image, torch.full_like(image, 50.0))
    same = predict_initial_pose(ckpt, outside, det, mask)
    torch.testing.assert_close(same, predict_initial_pose(ckpt, image, det, mask))

"""Tests for xvr_ros.core.registration: the multi-start before refinement (on test_refine's phantom)."""

from __future__ import annotations

import torch
from test_refine import DET, FIDUCIALS, offset, setup  # noqa: F401 - fixture

from xvr_ros.core.io.xray import Xray
from xvr_ros.core.metrics import mtre
from xvr_ros.core.register.registration import MULTISTART_OFFSETS, multistart, register


def test_multistart_starts_from_the_best_candidate(setup):  # noqa: F811
    renderer, truth, xray = setup
    # 15 degrees of LAO/RAO off (one of the offsets brings it back) plus a little of everything else.
    init = offset(truth, (-15.0, 1.0, 0.5), (3.0, -4.0, 2.0))
    assert (15.0, 0.0, 0.0) in MULTISTART_OFFSETS
    best, similarity = multistart(renderer, xray, DET, init.float())
    assert similarity.shape == (len(MULTISTART_OFFSETS),) and torch.isfinite(similarity).all()
    before = float(mtre(truth, init, FIDUCIALS)[0])
    after = float(mtre(truth, best.double(), FIDUCIALS)[0])
    assert after < before / 2, (before, after, similarity)


def test_register_with_and_without_multistart(setup):  # noqa: F811
    renderer, truth, xray = setup
    init = offset(truth, (-15.0, 1.0, 0.5), (3.0, -4.0, 2.0)).float()
    x = Xray(image=xray.float(), detector=DET)
    with_ms = register(renderer, x, init_pose=init)
    assert torch.equal(with_ms.initial_pose, init), "the reported initial pose stays the caller's"
    assert float(mtre(truth, with_ms.pose.double(), FIDUCIALS)[0]) < 2.0, with_ms.refinement.message
    single = register(renderer, x, init_pose=init, multistart_offsets=())
    assert torch.equal(single.refinement.init_pose, init)
    assert not torch.equal(with_ms.refinement.init_pose, init)

"""Frame-to-frame tracking (core/register/tracking.py): when to track, where to start, the tracked refinement."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from test_pose_filter import ISOCENTER, along_depth, carm, covariance
from test_refine import DET, FIDUCIALS, offset, setup  # noqa: F401 - fixture

from xvr_ros.core.geometry import carm_parameters, carm_pose, invert
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.metrics import mtre, pose_errors
from xvr_ros.core.register.tracking import (
    Tracker,
    TrackingOptions,
    correction,
    finished,
    same_intrinsics,
    screen,
    similarity_gain,
    started_far,
    track,
    tracking_factor,
    tracking_renderer,
    unfinished,
)
from xvr_ros.core.register.uncertainty import CHI2_6DOF_95, pose_uncertainty


def pose(alpha=10.0, beta=-5.0, gamma=3.0, x=4.0, y=820.0, z=-6.0):
    f64 = dict(dtype=torch.float64)
    return carm_pose(torch.tensor([alpha, beta, gamma], **f64), torch.tensor([x, y, z], **f64), degrees=True)


def test_tracks_only_a_recent_frame_with_the_same_intrinsics():
    tracker = Tracker(TrackingOptions(max_gap=0.5))
    assert "no accepted frame" in tracker.why_not(0.1, DET)
    tracker.accepted(1.0, pose(), DET)
    assert tracker.why_not(1.2, DET) == ""
    assert "since the last accepted frame" in tracker.why_not(1.6, DET)  # a gap in time
    assert "since the last accepted frame" in tracker.why_not(0.9, DET)  # an older frame
    zoomed = dataclasses.replace(DET, delx=2.0, dely=2.0)
    panned = dataclasses.replace(DET, x0=5.0)
    for other in (zoomed, panned, dataclasses.replace(DET, height=60)):
        assert not same_intrinsics(DET, other)
        assert "intrinsics changed" in tracker.why_not(1.2, other)
    assert same_intrinsics(DET, dataclasses.replace(DET, delx=DET.delx * (1 + 1e-9)))  # rounding is not a change
    assert tracker.rejected() and "no accepted frame" in tracker.why_not(1.2, DET)  # the default: one ends it
    lenient = Tracker(TrackingOptions(max_gap=0.5, max_rejections=3))
    lenient.accepted(1.0, pose(), DET)
    assert not lenient.rejected() and lenient.why_not(1.2, DET) == ""  # tracked again from the last accepted
    lenient.accepted(1.3, pose(), DET)  # an accepted frame clears the count
    assert not lenient.rejected() and not lenient.rejected()
    assert lenient.rejected()  # the third in a row ends the track
    assert "no accepted frame" in lenient.why_not(1.4, DET)


def test_a_frame_tracked_from_too_far_carries_the_track_once():
    """A frame whose similarity rose by more than max_gain is the track's next pose without being
    accepted; the second such frame in a row ends the track, an accepted one in between does not."""
    def tracked(start, end):
        return SimpleNamespace(refinement=SimpleNamespace(similarity=torch.tensor([end]),
                                                          trajectory=[torch.tensor([start])]))

    options = TrackingOptions(max_gap=1.0)
    assert started_far(tracked(0.87, 0.99), options) and not started_far(tracked(0.987, 0.99), options)
    tracker = Tracker(options)
    tracker.accepted(0.0, pose(x=4.0), DET)
    assert not tracker.far(0.1, pose(x=6.0), DET)  # the first: the track goes on from its pose
    prior, why = tracker.prior(0.2, DET)
    assert why == "" and torch.allclose(prior[0], pose(x=8.0))  # ... moving on at the velocity it shows
    tracker.accepted(0.2, pose(x=8.0), DET)
    assert not tracker.far(0.3, pose(x=9.0), DET)  # the count started again
    assert tracker.far(0.4, pose(x=10.0), DET)  # the second in a row ends the track
    assert "no accepted frame" in tracker.why_not(0.5, DET)


def test_far_frames_of_a_fluoroscopy_run_do_not_end_the_track():
    """Only far frames that rose by more than shot_gain (other shots) count towards max_far: on a
    busy CPU fluoroscopy frames after skipped ones rise by 0.005-0.014, and ending the track on two
    of them costs a full registration."""
    options = TrackingOptions(max_gap=1.0)
    assert options.max_gain < 0.01 < options.shot_gain < 0.03
    result = SimpleNamespace(similarity=torch.tensor([0.99]), trajectory=[torch.tensor([0.97])])
    reg = SimpleNamespace(refinement=result)
    assert similarity_gain(reg) == pytest.approx(0.02)
    tracker = Tracker(options)
    tracker.accepted(0.0, pose(x=4.0), DET)
    assert not tracker.far(0.1, pose(x=6.0), DET, gain=0.03)  # another shot: it counts
    assert not tracker.next_far_ends(0.01)
    assert not tracker.far(0.2, pose(x=7.0), DET, gain=0.01)  # a skipped fluoroscopy frame: the track goes on ...
    assert not tracker.next_far_ends(0.03)  # ... and the run of far frames starts over
    assert not tracker.far(0.3, pose(x=8.0), DET, gain=0.03)
    assert tracker.next_far_ends(0.03) and tracker.far(0.4, pose(x=9.0), DET, gain=0.03)  # two shots in a row


def test_screen_names_why_a_tracked_frame_is_not_for_the_gate():
    def tracked(start, end, converged=True, renders=4):
        return SimpleNamespace(refinement=SimpleNamespace(similarity=torch.tensor([end]), iterations=renders,
                                                          trajectory=[torch.tensor([start])],
                                                          converged=torch.tensor([converged])))

    tracker = Tracker(TrackingOptions(max_drop=0.05))
    tracker.accepted(0.0, pose(), DET, similarity=0.98)
    assert screen(tracked(0.979, 0.98), tracker) == ""
    assert screen(tracked(0.979, 0.98, converged=False, renders=1), tracker) == "unfinished"  # first
    assert screen(tracked(0.90, 0.98), tracker) == "far"
    assert screen(tracked(0.599, 0.60), tracker) == "fell"
    assert not tracker.next_far_ends()  # max_far 2: one far frame carries the track ...
    tracker.far(0.1, pose(), DET)
    assert tracker.next_far_ends()  # ... a second would end it


def test_behind_is_how_much_older_a_frame_is_than_the_last_accepted():
    tracker = Tracker()
    assert tracker.behind(5.0) == 0.0  # nothing accepted
    tracker.accepted(10.0, pose(), DET)
    assert tracker.behind(9.5) == pytest.approx(0.5) and tracker.behind(10.5) == 0.0


def test_a_match_that_fell_below_the_frame_tracked_from_is_noticed():
    tracker = Tracker(TrackingOptions(max_drop=0.05))
    assert not tracker.match_fell(0.1)  # nothing to compare with
    tracker.accepted(0.0, pose(), DET, similarity=0.98)
    assert not tracker.match_fell(0.95) and tracker.match_fell(0.60)
    tracker.far(0.1, pose(), DET)  # the track goes on from that frame, not vouched for: the reference stays
    assert not tracker.match_fell(0.95) and tracker.match_fell(0.66)
    tracker.accepted(0.2, pose(), DET)  # a frame without a similarity: no check
    assert not tracker.match_fell(0.1)
    tracker.accepted(0.3, pose(), DET, similarity=0.98)
    tracker.reset()
    assert not tracker.match_fell(0.1)


def test_the_prior_continues_at_the_last_velocity():
    tracker = Tracker(TrackingOptions(max_gap=1.0))
    tracker.accepted(0.0, pose(alpha=10.0, x=4.0), DET)
    prior, why = tracker.prior(0.2, DET)
    assert why == "" and torch.allclose(prior[0], pose(alpha=10.0, x=4.0))  # one frame: no velocity yet
    tracker.accepted(0.2, pose(alpha=11.0, x=5.0), DET)  # 5 deg/s, 5 mm/s
    prior, _ = tracker.prior(0.3, DET)
    angles, xyz = carm_parameters(prior[0], degrees=True)
    assert angles.tolist() == pytest.approx([11.5, -5.0, 3.0], abs=1e-9)
    assert xyz.tolist() == pytest.approx([5.5, 820.0, -6.0], abs=1e-9)
    still = Tracker(TrackingOptions(extrapolate=False))
    still.accepted(0.0, pose(alpha=10.0), DET)
    still.accepted(0.2, pose(alpha=11.0), DET)
    assert torch.allclose(still.prior(0.3, DET)[0][0], pose(alpha=11.0))


def test_the_velocity_crosses_the_angle_wrap():
    tracker = Tracker()
    tracker.accepted(0.0, pose(gamma=179.0), DET)
    tracker.accepted(0.1, pose(gamma=-179.0), DET)  # +2 deg across +-180
    prior, _ = tracker.prior(0.2, DET)
    rot, _ = pose_errors(pose(gamma=-177.0)[None], prior)
    assert float(rot[0]) < 1e-6


def test_accepted_frames_are_fused_by_the_filter_for_publishing():
    tracker, plain = Tracker(), Tracker(TrackingOptions(filter=False))
    frames = [along_depth(carm(alpha_deg=0.5 * i), 2.0 * (-1) ** i) for i in range(6)]  # depth noise +-2 mm
    for i, frame in enumerate(frames):
        published, cov = tracker.accepted(0.1 * i, frame, DET, covariance=covariance(frame), isocenter=ISOCENTER)
        same, same_cov = plain.accepted(0.1 * i, frame, DET, covariance=covariance(frame), isocenter=ISOCENTER)
        assert torch.equal(same, frame) and same_cov is not None and torch.equal(same_cov, covariance(frame))
    truth = carm(alpha_deg=2.5)
    assert (invert(truth) @ published)[:3, 3].norm() < 0.5 * (invert(truth) @ frames[-1])[:3, 3].norm()
    assert float(cov[2, 2]) < float(covariance(frames[-1])[2, 2]) and tracker.fused == 6 and plain.fused == 1
    # The next frame starts from the frames' own poses, where the image matched best.
    assert torch.allclose(tracker.prior(0.6, DET)[0], plain.prior(0.6, DET)[0])
    # A frame tracked from too far restarts the filter: the next accepted frame is published as it is.
    tracker.far(0.6, carm(alpha_deg=3.0), DET, gain=0.01)
    frame = along_depth(carm(alpha_deg=3.5), 2.0)
    assert torch.equal(tracker.accepted(0.7, frame, DET, covariance=covariance(frame), isocenter=ISOCENTER)[0], frame)
    # Without a covariance (nothing to weigh it by) the frame is taken as it is, and the filter restarts.
    assert torch.equal(Tracker().accepted(0.0, frames[0], DET)[0], frames[0])
    assert torch.equal(tracker.accepted(0.8, frame, DET)[0], frame) and tracker.fused == 1


def test_a_shared_hessian_flat_in_a_direction_is_not_shared_further():
    """Computed off the optimum it can be flat in depth: the filter cannot weigh the frames it
    serves, so the next frame computes its own."""
    tracker, hessian = Tracker(), SimpleNamespace(factor=1.0)
    tracker.accepted(0.0, carm(), DET, hessian, covariance=covariance(carm()), isocenter=ISOCENTER)
    assert tracker.hessian is hessian
    tracker.accepted(0.1, carm(), DET, hessian, covariance=covariance(carm(), depth_sd=100.0), isocenter=ISOCENTER)
    assert tracker.hessian is None


def test_a_frame_from_a_little_too_far_is_near_on_a_running_filter_and_judged_by_it():
    options = TrackingOptions(near_gap=0.3, near_frames=3)
    tracker, sharp = Tracker(options), covariance(carm(), depth_sd=0.7)  # a 512 px frame's
    for i in range(2):
        tracker.accepted(0.1 * i, carm(), DET, covariance=sharp, isocenter=ISOCENTER)
    assert not tracker.near(0.2, 0.01)  # two frames fused: too few to expect anything
    tracker.accepted(0.2, carm(), DET, covariance=sharp, isocenter=ISOCENTER)
    assert tracker.near(0.3, 0.01) and tracker.near(0.5, options.shot_gain)
    assert not tracker.near(0.51, 0.01)  # too long after the last accepted frame
    assert not tracker.near(0.3, 0.03)  # another shot
    assert tracker.surprise(0.3, carm(), sharp) <= CHI2_6DOF_95
    assert tracker.surprise(0.3, along_depth(carm(), 8.0), sharp) > CHI2_6DOF_95  # the depth lags 8 mm
    assert Tracker().surprise(0.3, carm(), sharp) == math.inf  # no filter: nothing expected
    rose = SimpleNamespace(refinement=SimpleNamespace(converged=torch.tensor([True]), iterations=4,
                                                      similarity=torch.tensor([0.99]),
                                                      trajectory=[torch.tensor([0.98])]))
    assert screen(rose, tracker, 0.3) == "near" and screen(rose, tracker, 0.6) == "far"
    assert screen(rose, tracker) == "far"  # no time: as before
    assert screen(rose, Tracker(dataclasses.replace(options, near_gap=0.0)), 0.3) == "far"


def test_the_correction_is_measured_about_the_isocenter():
    renderer = SimpleNamespace(isocenter=ISOCENTER)
    turned = SimpleNamespace(refinement=SimpleNamespace(init_pose=carm(alpha_deg=10.0)[None],
                                                        pose=carm(alpha_deg=12.0, x=1.5)[None]))
    mm, deg = correction(renderer, turned)  # 2 deg about the isocenter, the table 1.5 mm: not 30 mm of source
    assert mm == pytest.approx(1.5, abs=1e-3) and deg == pytest.approx(2.0, abs=1e-6)  # (the twist couples a little)


def test_a_far_network_estimate_means_the_view_changed():
    tracker = Tracker(TrackingOptions(max_jump_deg=20.0, max_jump_mm=100.0))
    tracker.accepted(0.0, pose(), DET)
    assert tracker.prior(0.1, DET, pose(alpha=25.0))[1] == ""  # the network's usual error: still tracked
    start, why = tracker.prior(0.1, DET, pose(alpha=45.0))
    assert start is None and "view changed" in why
    assert "view changed" in tracker.prior(0.1, DET, pose(x=150.0))[1]
    unchecked = Tracker(TrackingOptions(max_jump_deg=None, max_jump_mm=None))
    unchecked.accepted(0.0, pose(), DET)
    assert unchecked.prior(0.1, DET, pose(alpha=90.0))[1] == ""


def test_forget_drops_the_track_and_the_recent_pose():
    tracker = Tracker()
    tracker.accepted(5.0, pose(), DET)
    tracker.reset()
    assert tracker.recent_pose(5.5, DET) is not None  # the track ended, its last pose still a start
    tracker.accepted(6.0, pose(), DET)
    tracker.forget()  # another volume
    assert tracker.why_not(6.1, DET) and tracker.recent_pose(6.1, DET) is None


def test_time_going_backwards_restarts_the_track():
    tracker = Tracker()
    tracker.accepted(5.0, pose(), DET)
    tracker.accepted(0.0, pose(alpha=30.0), DET)  # a bag played again from its start
    prior, _ = tracker.prior(0.1, DET)
    assert torch.allclose(prior[0], pose(alpha=30.0))  # no velocity from the stale frame


def test_invalid_options_are_refused():
    for bad in (dict(max_gap=0.0), dict(size=4), dict(time_budget=0.0), dict(max_step_mm=0.0), dict(max_iterations=0),
                dict(max_rejections=0), dict(min_gain=-1.0), dict(plateau_renders=0),
                dict(plateau_tolerance=-1.0), dict(max_gain=0.0), dict(max_far=0), dict(max_drop=0.0),
                dict(max_gain=0.03, shot_gain=0.02), dict(filter_acceleration_mm=0.0),
                dict(filter_acceleration_rad=-1.0),
                dict(near_gap=-0.1), dict(near_frames=0)):
        with pytest.raises(ValueError):
            TrackingOptions(**bad)


def test_track_refines_a_frame_to_frame_offset(setup):  # noqa: F811 - the fixture
    renderer, truth, image = setup
    start = offset(truth, (0.6, -0.5, 0.4), (1.5, -2.0, 1.0))  # a frame's motion at 7.5 frames/s
    before = float(mtre(truth, start, FIDUCIALS)[0])
    reg = track(renderer, Xray(image, DET), start, options=TrackingOptions(time_budget=30.0))
    after = float(mtre(truth, reg.pose.double(), FIDUCIALS)[0])
    assert before > 2.0 and after < 0.5 * before, (before, after, reg.refinement.message)
    assert reg.initial_source == "tracking"
    assert reg.refinement.scales == (tracking_factor(DET),)  # one level only
    assert reg.refinement.iterations <= TrackingOptions().max_iterations
    assert reg.field_of_view is None or reg.field_of_view.shape == (1, 1, *DET.shape)
    assert math.isfinite(float(reg.refinement.similarity[0]))


def test_a_velocity_over_long_times_is_not_extrapolated():
    tracker = Tracker(TrackingOptions(max_gap=5.0, max_extrapolation=1.0))
    tracker.accepted(0.0, pose(alpha=10.0), DET)
    tracker.accepted(2.0, pose(alpha=12.0), DET)  # measured over 2 s: an average, not a velocity
    assert torch.allclose(tracker.prior(2.1, DET)[0][0], pose(alpha=12.0))
    tracker.accepted(2.5, pose(alpha=13.0), DET)  # measured over 0.5 s ...
    assert torch.allclose(tracker.prior(4.0, DET)[0][0], pose(alpha=13.0))  # ... but applied over 1.5 s: no
    angles, _ = carm_parameters(tracker.prior(2.6, DET)[0][0], degrees=True)
    assert float(angles[0]) == pytest.approx(13.2, abs=1e-9)


def test_newton_steps_with_the_last_frames_hessian_converge_in_a_few_renders(setup):  # noqa: F811 - the fixture
    renderer, truth, image = setup
    # The assessment of the previous frame (here: at the truth) supplies the Hessian.
    previous = pose_uncertainty(renderer, image, DET, truth, factor=tracking_factor(DET))
    start = offset(truth, (0.3, -0.2, 0.2), (0.8, -1.0, 0.5))
    options = TrackingOptions(time_budget=30.0, max_iterations=40)
    reg = track(renderer, Xray(image, DET), start, hessian=previous, options=options)
    before = float(mtre(truth, start, FIDUCIALS)[0])
    after = float(mtre(truth, reg.pose.double(), FIDUCIALS)[0])
    assert after < 0.3 * before, (before, after, reg.refinement.message)
    assert bool(reg.refinement.converged[0]) and reg.refinement.iterations < 15, reg.refinement.message
    # The similarity never gets worse: a step that would lower it is halved, not taken.
    assert float(reg.refinement.similarity[0]) >= float(reg.refinement.trajectory[0][0])


def test_a_refinement_cut_short_by_its_time_budget_is_unfinished(setup):  # noqa: F811 - the fixture
    renderer, truth, image = setup
    start = offset(truth, (0.6, -0.5, 0.4), (1.5, -2.0, 1.0))
    hessian = pose_uncertainty(renderer, image, DET, truth, factor=tracking_factor(DET))
    runs = {}
    for name, options in (("budget", TrackingOptions(time_budget=1e-9)),  # out of time before its first step
                          ("cap", TrackingOptions(time_budget=30.0, max_iterations=2)),
                          ("converged", TrackingOptions(time_budget=30.0, max_iterations=40))):
        reg = track(renderer, Xray(image, DET), start, hessian=hessian, options=options)
        runs[name] = (unfinished(reg, options), reg.refinement)
    assert runs["budget"][0] and runs["budget"][1].iterations == 1 and "time budget" in runs["budget"][1].message
    assert not runs["cap"][0] and "iteration cap" in runs["cap"][1].message  # the gate was fitted on such stops
    assert not runs["converged"][0] and bool(runs["converged"][1].converged[0])


def test_the_predicted_gain_is_the_quadratic_models():
    from xvr_ros.core.register.tracking import _gain

    H = torch.diag(torch.tensor([4.0, 1.0, 2.0, 100.0, 50.0, 10.0], dtype=torch.float64))
    g = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -1.0]], dtype=torch.float64)
    newton = -(torch.linalg.inv(H) @ g[0])[None]
    # At the Newton step the model's decrease of -s is g.H^-1.g / 2; half the step gains 3/4 of it.
    full = float(g[0] @ torch.linalg.inv(H) @ g[0]) / 2
    assert _gain(newton, g, H) == pytest.approx(full)
    assert _gain(newton / 2, g, H) == pytest.approx(0.75 * full)
    assert _gain(-newton, g, H) < 0  # uphill in -s


def test_a_step_predicted_to_gain_less_than_min_gain_ends_the_refinement(setup):  # noqa: F811 - the fixture
    renderer, truth, image = setup
    previous = pose_uncertainty(renderer, image, DET, truth, factor=tracking_factor(DET))
    start = offset(truth, (0.3, -0.2, 0.2), (0.8, -1.0, 0.5))
    runs = {}
    for min_gain in (0.0, 1e-6, 1.0):
        options = TrackingOptions(time_budget=30.0, max_iterations=40, min_gain=min_gain)
        runs[min_gain] = track(renderer, Xray(image, DET), start, hessian=previous, options=options).refinement
    assert runs[1.0].iterations == 1 and bool(runs[1.0].converged[0])  # no step could gain 1.0 of similarity
    assert runs[1e-6].iterations <= runs[0.0].iterations
    assert runs[1e-6].iterations > 1 and bool(runs[1e-6].converged[0]), runs[1e-6].message


def test_a_similarity_on_a_plateau_ends_the_refinement():
    from xvr_ros.core.register.tracking import _plateau

    def trajectory(*values):
        return [torch.tensor([v]) for v in values]

    options = TrackingOptions(plateau_renders=3, plateau_tolerance=1e-4)
    climbing = trajectory(0.980, 0.990, 0.9915, 0.9918, 0.9922)
    assert not _plateau(climbing, options)
    # Noise: steps that lower the similarity are not taken, those that raise it gain next to nothing.
    wandering = trajectory(0.980, 0.9920, 0.99152, 0.99188, 0.99205)
    assert _plateau(wandering, options)
    assert not _plateau(wandering[:3], options)  # too few renders to tell
    assert not _plateau(wandering, dataclasses.replace(options, plateau_tolerance=0.0))  # off


def test_the_tracker_shares_a_hessian_for_a_few_frames_and_forgets_it_on_a_rejection(setup):  # noqa: F811
    renderer, truth, image = setup
    unc = pose_uncertainty(renderer, image, DET, truth, factor=tracking_factor(DET))
    tracker = Tracker(TrackingOptions(hessian_frames=2))
    tracker.accepted(1.0, truth[0], DET, unc)
    assert tracker.hessian is unc  # used once: serves the next frame
    tracker.accepted(1.1, truth[0], DET, unc)
    assert tracker.hessian is None  # used twice: the next frame computes a fresh one
    tracker.accepted(1.2, truth[0], DET, unc)  # (a new one, in the refiner; here the same again)
    tracker.accepted(1.3, truth[0], DET, None)  # a full registration's frame brings none
    assert tracker.hessian is None
    tracker.accepted(1.4, truth[0], DET, unc)
    tracker.rejected()
    assert tracker.hessian is None and "no accepted frame" in tracker.why_not(1.5, DET)
    patient = Tracker(TrackingOptions(max_rejections=2))
    patient.accepted(1.0, truth[0], DET, unc)
    assert not patient.rejected() and patient.hessian is None  # tracked again, with a Hessian of its own


def test_a_track_starts_with_the_hessian_at_the_accepted_registrations_pose(setup):  # noqa: F811
    """At the registered pose the Hessian is positive definite; at the next frame's prior (here 1 deg
    and 3 mm away, a catch-up interval later) it has flat or negative directions."""
    from xvr_ros.core.register.tracking import track_hessian

    renderer, truth, image = setup
    xray = Xray(image, DET)
    at_pose = track_hessian(renderer, xray, SimpleNamespace(pose=truth.float(), mask=None))
    prior = offset(truth, (1.0, -1.0, 1.0), (3.0, -3.0, 3.0))
    at_prior = pose_uncertainty(renderer, image, DET, prior.float(), factor=tracking_factor(DET))
    assert at_pose.factor == tracking_factor(DET) and at_pose.flat_directions == 0
    assert at_prior.flat_directions > 0
    tracker = Tracker()
    tracker.accepted(1.0, truth[0], DET)  # a full registration's frame brings no Hessian ...
    assert tracker.hessian is None
    tracker.use_hessian(at_pose)  # ... the refiner computes it once the result is out
    assert tracker.hessian is at_pose
    reg = track(renderer, xray, prior, hessian=tracker.hessian, options=TrackingOptions(time_budget=30.0))
    assert reg.uncertainty is at_pose  # the first tracked frame computed none
    assert float(mtre(truth, reg.pose.double(), FIDUCIALS)[0]) < 0.5 * float(mtre(truth, prior, FIDUCIALS)[0])
    tracker.accepted(1.1, reg.pose[0], DET, reg.uncertainty)
    assert tracker.hessian is at_pose  # and serves the next ones


def test_a_full_registration_finished_on_the_tracking_level(setup):  # noqa: F811 - the fixture
    """A registration stopped on coarse scales, finished by Newton steps on the tracking level from
    its pose: the finished registration has that pose and Hessian, and the rest of the full one."""
    from xvr_ros.core.register.registration import register

    renderer, truth, image = setup
    xray = Xray(image.float(), DET)
    full = register(renderer, xray, init_pose=offset(truth).float(), scales=(16.0, 8.0), multistart_offsets=())
    tracked = track(renderer, xray, full.pose, field_of_view=full.field_of_view,
                    options=TrackingOptions(time_budget=30.0))
    done = finished(full, tracked)
    assert torch.equal(done.pose, tracked.pose.to(full.pose)) and done.uncertainty is tracked.uncertainty
    assert torch.equal(done.initial_pose, full.initial_pose) and done.field_of_view is full.field_of_view
    assert done.refinement.iterations == full.refinement.iterations and done.refinement.scales == (16.0, 8.0)
    assert done.refinement.message.startswith(full.refinement.message) and "tracking level" in done.refinement.message
    assert full.uncertainty is None and full.refinement.pose is not done.refinement.pose  # the full one is untouched
    before, after = (float(mtre(truth, r.pose.double(), FIDUCIALS)[0]) for r in (full, done))
    assert after < before, (before, after)


def test_the_tracking_renderer_shares_the_volume_with_finer_levels(setup):  # noqa: F811 - the fixture
    renderer, truth, _ = setup
    fine = tracking_renderer(renderer, TrackingOptions(footprint_ratio=0.5))
    assert fine.volume is renderer.volume and fine.footprint_ratio == 0.5 and renderer.footprint_ratio == 1.5
    source, _ = DET.scaled(4.0).rays(truth.float())
    assert all(a <= b for a, b in zip(fine.level_factors(DET.scaled(4.0), source),
                                      renderer.level_factors(DET.scaled(4.0), source)))


def test_the_last_accepted_pose_stays_a_start_for_the_full_path_after_the_track_ended():
    tracker = Tracker(TrackingOptions(max_gap=2.0))
    assert tracker.recent_pose(1.0, DET) is None
    tracker.accepted(1.0, pose(), DET)
    tracker.rejected()  # the track ended ...
    assert "no accepted frame" in tracker.why_not(1.5, DET)
    assert torch.equal(tracker.recent_pose(1.5, DET)[0], pose())  # ... its last pose is still a start
    assert tracker.recent_pose(3.5, DET) is None  # too old
    assert tracker.recent_pose(1.5, dataclasses.replace(DET, delx=2.0, dely=2.0)) is None  # other intrinsics

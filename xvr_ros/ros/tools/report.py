"""Scoring and reporting shared by ``make demo`` and ``xvr-ros replay``.

- :class:`FrameReport`: one image and what became of it;
- :func:`record_outputs`: latencies and the ``RegistrationResult`` fields the client received for it;
- :func:`score_frame`: its initial (network) and refined pose against a known pose: mTRE on CT
  points, rotation and translation errors (:mod:`xvr_ros.core.metrics`);
- :func:`summarize`: counts, error and latency statistics, SMSR, throughput of a run; for
  fluoroscopy at video rate the fraction of frames with a TF, the frames per refinement path
  (``full`` or ``tracking``) and the frames until an accepted pose after a rejection;
- :func:`format_table`, :func:`format_summary`: the replay's text; :func:`number`: table cells;
- :func:`write_report`: ``report.json`` and ``report.png`` (error and latency per frame, by path).

Lengths mm, angles degrees, latencies ms (from the image's publication).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "PATHS",
    "STATUSES",
    "FrameReport",
    "by_path",
    "figure",
    "format_summary",
    "format_table",
    "number",
    "percentile",
    "plot",
    "record_outputs",
    "recovery",
    "score_frame",
    "stats",
    "summarize",
    "write_report",
]

#: What became of an image: registered and accepted (a TF arrived); registered but rejected by the
#: refiner's quality gate (a result with ``accepted`` false, no TF); a newer image replaced it while
#: a node was busy; a node reported it as an error (or it was corrupt); no answer in time.
STATUSES = ("registered", "rejected", "dropped", "error", "lost")
#: ``RegistrationResult.path``: refined from the network's pose (coarse to fine) or from the last accepted pose.
PATHS = ("full", "tracking")


@dataclass
class FrameReport:
    """One image and what became of it (lengths mm, angles degrees, latencies ms)."""

    index: int
    bag_time_s: float = 0.0  # replay: since the bag's first message
    tag: str = ""  # demo: the detector (intrinsics) of the frame
    stamp: str = ""
    encoding: str = ""
    size: str = ""
    status: str = "lost"  # one of STATUSES
    message: str = ""
    ground_truth: bool = False
    init_mtre: float | None = None
    ref_mtre: float | None = None
    init_rot: float | None = None
    ref_rot: float | None = None
    init_trans: float | None = None
    ref_trans: float | None = None
    lat_pose: float | None = None
    lat_tf: float | None = None
    iterations: int | None = None
    initial_similarity: float | None = None
    similarity: float | None = None
    converged: bool | None = None
    accepted: bool | None = None  # RegistrationResult.accepted: the TF was published
    p_success: float | None = None  # RegistrationResult.p_success: P(mTRE < 1 mm) by the quality model
    dropped: int | None = None  # frames any node dropped since the previous result (RegistrationResult.dropped)
    path: str = ""  # RegistrationResult.path: which refinement produced the result (PATHS); empty without one


# --------------------------------------------------------------------------------------------
# One frame
# --------------------------------------------------------------------------------------------
def record_outputs(frame: FrameReport, client, key: tuple[int, int], published: float) -> None:
    """Latencies (from ``published``, ``time.perf_counter()`` s) and the registration result's
    structured fields of the image with stamp ``key``, from what ``client`` has received so far."""
    if frame.lat_pose is None and (hit := client.get("pose", key)) is not None:
        frame.lat_pose = 1e3 * (hit[0] - published)
    if frame.lat_tf is None and (hit := client.get("tf", key)) is not None:
        frame.lat_tf = 1e3 * (hit[0] - published)
    if frame.iterations is None and (hit := client.get("result", key)) is not None:
        m = hit[1]
        frame.iterations, frame.converged, frame.dropped = int(m.iterations), bool(m.converged), int(m.dropped)
        frame.initial_similarity, frame.similarity = float(m.initial_similarity), float(m.similarity)
        frame.accepted, frame.p_success = bool(m.accepted), float(m.p_success)
        frame.message, frame.path = m.status, m.path


def score_frame(frame: FrameReport, client, key: tuple[int, int], true: torch.Tensor, detector, points) -> None:
    """Errors of the initial pose and the refined pose of stamp ``key``: the TF of a registered
    frame, the result's refined pose of a rejected one (to see what the quality gate kept back).

    ``true``: (4, 4) C-arm pose (mm, the core's convention) the image was taken at; ``detector``:
    its intrinsics; ``points``: (N, 3) CT points (mm) for the mTRE. The messages are in the optical
    frame and metres; :mod:`xvr_ros.ros.convert` brings them to the core's C-arm frame.
    """
    from xvr_ros.core.metrics import mtre, pose_errors
    from xvr_ros.ros import convert

    true = true.to(torch.float64)[None]
    refined = {
        "registered": ("tf", lambda m: convert.transform_from_msg(m.transform)),
        "rejected": ("result", lambda m: convert.pose_from_msg(m.refined_pose.pose)),
    }
    estimates = [("init", "pose", lambda m: convert.pose_from_msg(m.pose.pose))]
    if frame.status in refined:
        estimates.append(("ref", *refined[frame.status]))
    for prefix, kind, pose_of in estimates:
        hit = client.get(kind, key)
        if hit is None:
            continue
        est = convert.carm_from_optical(pose_of(hit[1]), detector)[None].to(torch.float64)
        rot, trans = pose_errors(true, est)
        setattr(frame, f"{prefix}_mtre", float(mtre(true, est, points)[0]))
        setattr(frame, f"{prefix}_rot", float(rot[0]))
        setattr(frame, f"{prefix}_trans", float(trans[0]))


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def percentile(values, q) -> float | None:
    """The ``q``-th percentile of the finite values (None entries skipped); None if there are none."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.percentile(v, q)) if v else None


def stats(values) -> dict:
    """``n`` (values present), ``median``, ``q25``, ``q75``, ``p95`` of the values."""
    return {"n": sum(1 for x in values if x is not None), "median": percentile(values, 50),
            "q25": percentile(values, 25), "q75": percentile(values, 75), "p95": percentile(values, 95)}


def summarize(frames: list[FrameReport], wall_s: float) -> dict:
    """A run's summary: counts by status, error and latency statistics, SMSR, throughput.

    ``frames`` in the order they were taken. ``tf_fraction``: registered (accepted, TF) frames of
    all frames, 0..1; ``paths``: per refinement path (:func:`by_path`); ``recovery_frames``:
    :func:`recovery`; ``accepted_mtre_mm``: mTRE of the frames with a TF (``ref_mtre_mm``: of every
    refined result, accepted or rejected).
    """
    from xvr_ros.core.metrics import smsr

    count = {s: sum(1 for f in frames if f.status == s) for s in STATUSES}
    ref = [f.ref_mtre for f in frames if f.ref_mtre is not None]  # accepted and rejected
    accepted = [f.ref_mtre for f in frames if f.status == "registered" and f.ref_mtre is not None]
    rejected = [f.ref_mtre for f in frames if f.status == "rejected" and f.ref_mtre is not None]
    return {
        "frames": len(frames),
        **count,
        "tf_fraction": count["registered"] / len(frames) if frames else None,
        "paths": by_path(frames),
        "recovery_frames": recovery(frames),
        "scored": len(ref),
        "accepted_over_2mm": sum(1 for x in accepted if x > 2.0),  # the gate's false accepts
        "rejected_below_1mm": sum(1 for x in rejected if x < 1.0),  # its false rejections
        "wall_time_s": wall_s,
        "registered_per_s": count["registered"] / wall_s if wall_s > 0 else None,
        "init_mtre_mm": stats([f.init_mtre for f in frames]),
        "ref_mtre_mm": stats(ref),
        "accepted_mtre_mm": stats(accepted),
        "smsr_percent": smsr(torch.tensor(ref)) if ref else None,
        "ref_rot_deg": stats([f.ref_rot for f in frames]),
        "ref_trans_mm": stats([f.ref_trans for f in frames]),
        "latency_pose_ms": stats([f.lat_pose for f in frames]),
        "latency_tf_ms": stats([f.lat_tf for f in frames]),
    }


def by_path(frames: list[FrameReport]) -> dict:
    """Per refinement path of the frames with a result (registered or rejected): ``frames`` from
    it, how many of them were ``accepted`` (TF), their image -> TF latency (ms). :data:`PATHS`
    always, then any other path a result named, then ``unnamed`` if a result named none (a node
    from before the field)."""
    results = [f for f in frames if f.status in ("registered", "rejected")]
    others = sorted({f.path or "unnamed" for f in results} - set(PATHS))
    out = {}
    for name in (*PATHS, *others):
        sel = [f for f in results if (f.path or "unnamed") == name]
        out[name] = {"frames": len(sel), "accepted": sum(1 for f in sel if f.status == "registered"),
                     "latency_tf_ms": stats([f.lat_tf for f in sel])}
    return out


def recovery(frames: list[FrameReport]) -> dict:
    """Frames from a rejection to the next frame with a TF, ``frames`` in the order they were taken.

    Every run of frames without a TF (rejected, dropped, error, lost) that holds a rejection is one
    episode, counted from its first rejection: registered, rejected, dropped, dropped, registered
    -> 3 frames. An episode still open at the end of the run is ``unrecovered`` and not in the
    ``median`` / ``max`` (None without a recovered episode).
    """
    recovered, start = [], None
    for i, f in enumerate(frames):
        if f.status == "registered":
            if start is not None:
                recovered.append(i - start)
            start = None
        elif f.status == "rejected" and start is None:
            start = i
    return {"episodes": len(recovered) + (start is not None), "unrecovered": int(start is not None),
            "median": percentile(recovered, 50), "max": max(recovered) if recovered else None}


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
def number(x, fmt="{:.1f}") -> str:
    """``fmt.format(x)``, or ``--`` for a missing or non-finite value (report tables)."""
    return "--" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def format_table(frames: list[FrameReport]) -> list[str]:
    """The replay's per-frame table, one line per image."""
    head = (f"{'frame':>5} {'t s':>6} {'encoding':<8} {'size':>7} {'status':<10} {'path':<8} {'init mm':>8} "
            f"{'ref mm':>8} {'rot deg':>7} {'trans mm':>8} {'ms->pose':>8} {'ms->TF':>7}  note")
    lines = [head, "-" * len(head)]
    for f in frames:
        note = f.message if f.status != "registered" else ""
        lines.append(
            f"{f.index:>5} {f.bag_time_s:>6.1f} {f.encoding:<8} {f.size:>7} {f.status:<10} {f.path or '--':<8} "
            f"{number(f.init_mtre):>8} {number(f.ref_mtre, '{:.2f}'):>8} {number(f.ref_rot, '{:.2f}'):>7} "
            f"{number(f.ref_trans, '{:.2f}'):>8} {number(f.lat_pose, '{:.0f}'):>8} {number(f.lat_tf, '{:.0f}'):>7}  "
            f"{note[:90]}"
        )
    return lines


def _spread(d: dict, fmt: str = "{:.2f}") -> str:
    return (f"median {number(d['median'], fmt)} (IQR {number(d['q25'], fmt)}-{number(d['q75'], fmt)}, "
            f"p95 {number(d['p95'], fmt)}), n={d['n']}")


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def format_summary(s: dict) -> list[str]:
    """The replay's summary of :func:`summarize`'s dict."""
    rec = s["recovery_frames"]
    paths = ", ".join(
        f"{name} {p['frames']} ({p['accepted']} accepted; image -> TF p50 "
        f"{number(p['latency_tf_ms']['median'], '{:.0f}')} / p95 {number(p['latency_tf_ms']['p95'], '{:.0f}')} ms)"
        for name, p in s["paths"].items()
    )
    return [
        f"frames {s['frames']}: registered {s['registered']} (accepted, TF), rejected {s['rejected']} (quality gate, "
        f"no TF), dropped {s['dropped']} (a newer frame arrived, or skipped), errors {s['error']}, lost {s['lost']}; "
        f"{s['scored']} scored against ground truth",
        f"  TF for {number(_percent(s['tf_fraction']), '{:.1f}')} % of the frames; results by path: {paths}",
        f"  recovery after a rejection: {rec['episodes']} episodes, median {number(rec['median'], '{:.0f}')} / "
        f"max {number(rec['max'], '{:.0f}')} frames to the next TF, {rec['unrecovered']} without one by the end",
        f"  quality gate: {s['accepted_over_2mm']} accepted with mTRE > 2 mm, "
        f"{s['rejected_below_1mm']} rejected with mTRE < 1 mm",
        f"  mTRE initial (network): {_spread(s['init_mtre_mm'], '{:.1f}')} mm",
        f"  mTRE refined:           {_spread(s['ref_mtre_mm'])} mm; "
        f"SMSR (< 1 mm) {number(s['smsr_percent'], '{:.0f}')} %",
        f"  mTRE accepted (TF):     {_spread(s['accepted_mtre_mm'])} mm",
        f"  rotation error {_spread(s['ref_rot_deg'])} deg; translation error {_spread(s['ref_trans_mm'])} mm",
        f"  latency image -> pose {_spread(s['latency_pose_ms'], '{:.0f}')} ms; "
        f"image -> TF {_spread(s['latency_tf_ms'], '{:.0f}')} ms",
        f"  {number(s['registered_per_s'], '{:.2f}')} registered frames/s over {s['wall_time_s']:.1f} s",
    ]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_report(report, out: Path, title: str) -> None:
    """``out/report.json`` (the dataclass ``report``, with its ``frames``) and ``out/report.png``, atomically."""
    from xvr_ros.core.io.files import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=1))
    plot(report.frames, out / "report.png", title)


def plot(frames: list[FrameReport], path: Path, title: str) -> None:
    """:func:`figure`, written atomically as a PNG."""
    import matplotlib.pyplot as plt

    from xvr_ros.core.io.files import atomic_path

    fig = figure(frames, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def figure(frames: list[FrameReport], title: str):
    """A matplotlib figure (Agg backend) of the frames' errors (top) and latencies (bottom) against
    the frame index; the refined errors and TF latencies are marked by refinement path, frames
    without a TF shaded by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    _plot_errors(ax1, frames)
    ax1.set_title(title, fontsize=10)
    _plot_latencies(ax2, frames)
    _shade_unregistered((ax1, ax2), frames)
    ax1.legend(loc="upper right", fontsize=8, ncol=3)
    ax2.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    return fig


#: Marker and colour of each refinement path's points; a path not listed gets a diamond.
_PATH_STYLE = {"full": ("o", "C1"), "tracking": ("s", "C2")}


def _path_groups(frames: list[FrameReport]):
    """(label suffix, marker, colour, frames) for each refinement path the frames name (PATHS
    first; frames without a result or path last, unlabelled)."""
    others = sorted({f.path for f in frames} - set(PATHS))
    for k, name in enumerate((*PATHS, *others)):
        sel = [f for f in frames if f.path == name]
        if sel:
            marker, colour = _PATH_STYLE.get(name, ("D", f"C{4 + k}"))
            yield (f" ({name})" if name else ""), marker, colour, sel


def _plot_series(ax, frames: list[FrameReport], attr: str, scale: float, label: str, marker: str, colour: str):
    present = [f for f in frames if getattr(f, attr) is not None]
    if present:
        ax.plot([f.index for f in present], [getattr(f, attr) * scale for f in present], marker, color=colour,
                label=label, ms=4)


def _plot_errors(ax, frames: list[FrameReport]) -> None:
    _plot_series(ax, frames, "init_mtre", 1.0, "initial (network)", "x", "C0")
    for suffix, marker, colour, sel in _path_groups(frames):
        _plot_series(ax, sel, "ref_mtre", 1.0, "refined" + suffix, marker, colour)
    ax.axhline(1.0, color="g", lw=0.8, ls="--", label="1 mm")
    ax.axhline(2.0, color="r", lw=0.8, ls=":", label="2 mm")  # an accepted frame above it is a false accept
    ax.set_yscale("log")
    ax.set_ylabel("mTRE, mm")


def _plot_latencies(ax, frames: list[FrameReport]) -> None:
    _plot_series(ax, frames, "lat_pose", 1e-3, "image -> initial pose", "x", "C0")
    for suffix, marker, colour, sel in _path_groups(frames):
        _plot_series(ax, sel, "lat_tf", 1e-3, "image -> TF" + suffix, marker, colour)
    ax.set_ylabel("latency, s")
    ax.set_xlabel("frame")


def _shade_unregistered(axes, frames: list[FrameReport]) -> None:
    for status, colour in (("rejected", "#c6dbef"), ("dropped", "0.85"), ("error", "#f4a6a6"), ("lost", "#f6d365")):
        for i, f in enumerate(x for x in frames if x.status == status):
            for ax in axes:
                label = status if i == 0 and ax is axes[0] else None
                ax.axvspan(f.index - 0.5, f.index + 0.5, color=colour, lw=0, label=label)

"""Tests for xvr_ros.ros.tools.report: the summary numbers of a run, its text, ``report.json`` and the plot."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from xvr_ros.ros.tools.report import (
    FrameReport,
    figure,
    format_summary,
    format_table,
    record_outputs,
    recovery,
    summarize,
    write_report,
)


def frames_of(statuses: str, paths: str = "") -> list[FrameReport]:
    """Frames from one letter per frame: Registered (TF), reJected, Dropped, Error, Lost; ``paths``
    (one letter per frame, F = full, T = tracking, - = none) defaults to full for a result."""
    names = {"R": "registered", "J": "rejected", "D": "dropped", "E": "error", "L": "lost"}
    paths = paths or "".join("F" if c in "RJ" else "-" for c in statuses)
    return [
        FrameReport(i, status=names[c], path={"F": "full", "T": "tracking", "-": ""}[p])
        for i, (c, p) in enumerate(zip(statuses, paths, strict=True))
    ]


def test_recovery_counts_frames_from_the_rejection_to_the_next_tf():
    assert recovery(frames_of("RJDDR")) == {"episodes": 1, "unrecovered": 0, "median": 3.0, "max": 3}
    # Counted from the run's first rejection (the drop before it and the rejections after it
    # belong to the same episode); a rejection right before a TF recovers in 1 frame.
    assert recovery(frames_of("RDJJDRJR")) == {"episodes": 2, "unrecovered": 0, "median": 2.0, "max": 3}
    # Runs without a rejection are no episode; one the run ends in is unrecovered, not in median/max.
    assert recovery(frames_of("DRDDRJD")) == {"episodes": 1, "unrecovered": 1, "median": None, "max": None}
    assert recovery(frames_of("JRJEDLRJR")) == {"episodes": 3, "unrecovered": 0, "median": 1.0, "max": 4}
    assert recovery([]) == {"episodes": 0, "unrecovered": 0, "median": None, "max": None}


def test_summary_of_a_tracking_run():
    frames = frames_of("RRJDDRRDRE", paths="FTT--TT-F-")
    errors = {0: 0.5, 1: 0.2, 2: 3.0, 5: 2.5, 6: 0.3, 8: 0.4}  # mm; frame 5 is a false accept
    tf_ms = {0: 900.0, 1: 100.0, 5: 300.0, 6: 200.0, 8: 1100.0}
    for f in frames:
        f.ref_mtre, f.lat_tf = errors.get(f.index), tf_ms.get(f.index)
    s = summarize(frames, wall_s=2.0)

    assert (s["frames"], s["registered"], s["rejected"], s["dropped"], s["error"]) == (10, 5, 1, 3, 1)
    assert s["tf_fraction"] == pytest.approx(0.5)
    assert (s["paths"]["full"]["frames"], s["paths"]["full"]["accepted"]) == (2, 2)
    assert (s["paths"]["tracking"]["frames"], s["paths"]["tracking"]["accepted"]) == (4, 3)
    assert s["paths"]["tracking"]["latency_tf_ms"]["median"] == pytest.approx(200.0)
    assert s["recovery_frames"] == {"episodes": 1, "unrecovered": 0, "median": 3.0, "max": 3}
    assert s["accepted_over_2mm"] == 1 and s["rejected_below_1mm"] == 0
    # Accepted only (0.2, 0.3, 0.4, 0.5, 2.5) vs every refined result (with the rejected 3.0).
    assert s["accepted_mtre_mm"]["median"] == pytest.approx(0.4) and s["accepted_mtre_mm"]["n"] == 5
    assert s["ref_mtre_mm"]["median"] == pytest.approx(0.45) and s["ref_mtre_mm"]["n"] == 6
    assert s["latency_tf_ms"]["median"] == pytest.approx(300.0)

    text = "\n".join(format_summary(s))
    assert "TF for 50.0 % of the frames" in text
    assert "full 2 (2 accepted; image -> TF p50 1000 / p95 1090 ms)" in text
    assert "tracking 4 (3 accepted; image -> TF p50 200 / p95 290 ms)" in text
    assert "1 episodes, median 3 / max 3 frames to the next TF, 0 without one by the end" in text
    assert "mTRE accepted (TF):     median 0.40" in text
    table = format_table(frames)
    assert "path" in table[0] and "full" in table[2] and "tracking" in table[2 + 6]


def test_summary_of_an_empty_run_and_unknown_paths():
    s = summarize([], wall_s=0.0)
    assert s["tf_fraction"] is None and s["paths"]["tracking"]["frames"] == 0
    format_summary(s)  # no number to show is "--", not an error
    frames = frames_of("RRJD", paths="F---")
    frames[1].path = "other"
    paths = summarize(frames, 1.0)["paths"]
    assert list(paths) == ["full", "tracking", "other", "unnamed"]  # a result without a path is not lost
    assert [(p["frames"], p["accepted"]) for p in paths.values()] == [(1, 1), (0, 0), (1, 1), (1, 0)]


def test_record_outputs_keeps_the_results_path():
    result = SimpleNamespace(iterations=7, converged=True, dropped=2, initial_similarity=0.1, similarity=0.9,
                             accepted=True, p_success=0.97, status="ok", path="tracking")
    client = SimpleNamespace(get=lambda kind, key: (12.5, result) if kind == "result" else None)
    frame = FrameReport(0)
    record_outputs(frame, client, (1, 2), published=12.0)
    assert (frame.path, frame.iterations, frame.dropped, frame.accepted, frame.lat_tf) == ("tracking", 7, 2, True, None)


@dataclass
class _Report:
    frames: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def test_report_files_show_the_paths(tmp_path):
    frames = frames_of("RRJDDRR", paths="FTT--FT")
    for f in frames:
        if f.path:  # a result
            f.init_mtre, f.ref_mtre, f.lat_pose = 30.0, 0.3 + f.index / 10, 50.0
            f.lat_tf = 150.0 if f.status == "registered" else None
    report = _Report(frames, summarize(frames, 1.0))
    write_report(report, tmp_path / "out", "a tracking run")

    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [f["path"] for f in data["frames"]] == ["full", "tracking", "tracking", "", "", "full", "tracking"]
    summary = data["summary"]
    assert summary["paths"]["tracking"]["frames"] == 3 and summary["tf_fraction"] == pytest.approx(4 / 7)
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    import matplotlib.pyplot as plt

    fig = figure(frames, "a tracking run")
    errors, latencies = fig.axes
    labels = [t.get_text() for t in errors.get_legend().get_texts()]
    assert {"refined (full)", "refined (tracking)", "initial (network)", "rejected", "dropped"} <= set(labels)
    by_label = {line.get_label(): line for line in errors.get_lines()}
    assert list(by_label["refined (tracking)"].get_xdata()) == [1, 2, 6]  # the rejected one too
    assert list(by_label["refined (full)"].get_xdata()) == [0, 5]
    tf = {line.get_label(): list(line.get_xdata()) for line in latencies.get_lines()}
    assert tf["image -> TF (full)"] == [0, 5] and tf["image -> TF (tracking)"] == [1, 6]
    plt.close(fig)

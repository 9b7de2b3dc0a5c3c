"""Smoke test of ``make demo``: the whole pipeline (in-process nodes, Finetune action, streamed
frames with a mid-sequence intrinsics change, TF out, table, summary, overlays), reduced to a
tiny network, a few training steps and two small frames."""

from __future__ import annotations

import re

from xvr_ros.demo import run_demo

TINY = {"model_manager": dict(height=32, batch_size=2, use_ncc=False, validation_poses=8, canonical_delx_mm=8.0,
                              feedback_rate_hz=20.0)}


def test_reduced_demo(tmp_path, capsys, ros_domain):  # noqa: F811
    rc = run_demo(tmp_path / "demo", "cpu", train_budget=0.0, max_steps=3, frames=2, size=64, refine_budget=2.0,
                  node_overrides=TINY)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "training de novo" in out and re.search(r"step \d+/3", out), out
    rows = [line for line in out.splitlines() if re.match(r"\s+[01]\s+(std|zoom) ", line)]
    assert len(rows) == 2, out
    assert "std 64px" in rows[0] and "zoom 50px" in rows[1] and "pp+10,-6" in rows[1]
    for row in rows:  # registered (TF), or rejected by the refiner's quality gate (the CI network is poor)
        assert "(no TF)" not in row and "(no initial pose)" not in row, row
        assert re.search(r" \d+(  \(rejected, p_success [\d.]+: no TF\))?$", row), f"no dropped count in {row!r}"
    summary = re.search(r"summary: (\d)/2 frames registered \(TF received\), (\d) rejected by the quality gate", out)
    assert summary and int(summary[1]) + int(summary[2]) == 2, out
    assert re.search(r"mTRE refined: +median [\d.]+ mm", out) and "SMSR (< 1 mm)" in out
    assert re.search(r"image -> TF: p50 (\d+|--) ms, p95 (\d+|--) ms", out) and "verdict:" in out  # -- = no TF
    assert len(list((tmp_path / "demo" / "overlays").glob("frame_*.png"))) == 2
    assert (tmp_path / "demo" / "models" / "chest_demo.pth").is_file()
    assert re.search(r"total demo time \d+ s", out)

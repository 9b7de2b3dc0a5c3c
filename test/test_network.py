"""Pose-regression network: timm-compatible ResNet layout, heads, pose validity, input transform."""

import pytest
import torch

from xvr_ros.core.model import network as net
from xvr_ros.core.model.network import (
    PoseRegressor,
    build_backbone,
    default_network,
    normalize_xray,
)

SMALL = 32  # input side for forward passes: keeps every test well under a second on 2 cores


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return PoseRegressor("resnet18")


def _randomize_norms(model):
    """Timm zero-initialises the last norm of every block (a fresh block is the identity); undo that
    so every parameter takes part in the forward pass."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


@pytest.mark.parametrize("model_name", ["resnet18", "resnet34"])
@pytest.mark.parametrize("norm_layer", ["groupnorm", "batchnorm"])
def test_shapes(model_name, norm_layer):
    torch.manual_seed(0)
    model = PoseRegressor(model_name, norm_layer=norm_layer).eval()
    x = torch.randn(2, 1, SMALL, SMALL)
    with torch.no_grad():
        assert model.backbone(x).shape == (2, 512)
        rot, xyz = model.predict_parameters(x)
        pose = model(x)
    assert rot.shape == (2, 10) and xyz.shape == (2, 3)
    assert pose.shape == (2, 4, 4)
    assert torch.isfinite(pose).all()
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
    want = torch.nn.GroupNorm if norm_layer == "groupnorm" else torch.nn.BatchNorm2d
    assert norms and all(type(m) is want for m in norms)
    if norm_layer == "groupnorm":
        assert all(m.num_groups == 32 and m.eps == 1e-5 and m.affine for m in norms)
        assert not any("running" in k or "num_batches" in k for k in model.state_dict())
    else:
        assert "backbone.bn1.running_mean" in model.state_dict()
        assert "backbone.layer2.0.downsample.1.num_batches_tracked" in model.state_dict()


def test_resnet50_bottleneck_layout():
    backbone = build_backbone("resnet50")
    assert backbone.num_features == 2048
    keys = backbone.state_dict().keys()
    for k in ["layer1.0.conv3.weight", "layer1.0.bn3.bias", "layer1.0.downsample.0.weight", "layer4.2.conv3.weight"]:
        assert k in keys
    assert backbone.layer1[0].downsample[0].weight.shape == (256, 64, 1, 1)
    assert backbone.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3 (timm / torchvision v1.5)
    assert sum(p.numel() for p in backbone.parameters()) == 23_501_760


def _conv(cin, cout, k):
    return cin * cout * k * k


def test_resnet18_parameter_count_from_first_principles(resnet18):
    norm = 2  # weight + bias per channel (GroupNorm and BatchNorm alike)
    total = _conv(1, 64, 7) + norm * 64  # stem
    cin = 64
    for i in range(4):
        c = 64 * 2**i
        for b in range(2):
            total += _conv(cin if b == 0 else c, c, 3) + norm * c + _conv(c, c, 3) + norm * c
            if b == 0 and cin != c:
                total += _conv(cin, c, 1) + norm * c  # downsample conv + norm
        cin = c
    backbone = sum(p.numel() for p in resnet18.backbone.parameters())
    assert backbone == total == 11_170_240  # timm resnet18(in_chans=1, num_classes=0)
    heads = sum(p.numel() for n, p in resnet18.named_parameters() if not n.startswith("backbone."))
    assert heads == 512 * 10 + 10 + 512 * 3 + 3


def test_state_dict_keys_are_timm_layout(resnet18):
    keys = set(resnet18.state_dict())
    expected = [
        "backbone.conv1.weight",
        "backbone.bn1.weight",
        "backbone.bn1.bias",
        "backbone.layer1.0.conv1.weight",
        "backbone.layer1.0.bn1.weight",
        "backbone.layer1.0.bn1.bias",
        "backbone.layer1.0.conv2.weight",
        "backbone.layer1.0.bn2.weight",
        "backbone.layer1.0.bn2.bias",
        "backbone.layer1.1.conv1.weight",
        "backbone.layer2.0.conv1.weight",
        "backbone.layer2.0.downsample.0.weight",
        "backbone.layer2.0.downsample.1.weight",
        "backbone.layer2.0.downsample.1.bias",
        "backbone.layer3.0.downsample.0.weight",
        "backbone.layer4.0.downsample.1.bias",
        "backbone.layer4.1.bn2.bias",
        "rot_regression.weight",
        "rot_regression.bias",
        "xyz_regression.weight",
        "xyz_regression.bias",
    ]
    assert set(expected) <= keys
    assert all(k.startswith(("backbone.", "rot_regression.", "xyz_regression.")) for k in keys)
    assert not any("layer1.0.downsample" in k or ".fc." in k or "global_pool" in k for k in keys)
    sd = resnet18.state_dict()
    assert sd["backbone.conv1.weight"].shape == (64, 1, 7, 7)
    assert sd["backbone.layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert len([k for k in keys if k.startswith("backbone.")]) == 1 + 2 + 8 * (3 + 3) + 3 * 3


def test_timm_initialisation(resnet18):
    # zero_init_last: the last norm of every residual block starts at zero.
    for layer in (resnet18.backbone.layer1, resnet18.backbone.layer4):
        for block in layer:
            assert torch.all(block.bn2.weight == 0)
            assert torch.all(block.bn1.weight == 1)


@pytest.mark.parametrize(
    "parameterization, convention, n",
    [
        ("quaternion_adjugate", None, 10),
        ("rotation_6d", None, 6),
        ("quaternion", None, 4),
        ("euler_angles", "ZXY", 3),
        ("axis_angle", None, 3),
        ("so3_log", None, 3),
        ("se3_log_map", None, 3),
    ],
)
def test_rotation_head_sizes(parameterization, convention, n):
    model = PoseRegressor(parameterization=parameterization, convention=convention)
    assert model.rot_regression.out_features == n and model.xyz_regression.out_features == 3
    with torch.no_grad():
        pose = model.eval()(torch.randn(1, 1, SMALL, SMALL))
    R = pose[0, :3, :3]
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-4, rtol=0)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18.*resnet34"):
        PoseRegressor("resnet19")
    with pytest.raises(ValueError, match="quaternion_adjugate"):
        PoseRegressor(parameterization="quaternion_conjugate")
    with pytest.raises(ValueError, match="groupnorm"):
        PoseRegressor(norm_layer="layernorm")
    with pytest.raises(ValueError, match="convention"):
        PoseRegressor(parameterization="euler_angles")


def test_forward_is_pose_from_parameters(resnet18):
    from xvr_ros.core.geometry import pose_from_parameters

    model = PoseRegressor("resnet18", unit_conversion_factor=1000.0).eval()
    x = torch.randn(2, 1, SMALL, SMALL)
    with torch.no_grad():
        rot, xyz = model.predict_parameters(x)
        raw = model.xyz_regression(model.backbone(x))
        pose = model(x)
    torch.testing.assert_close(xyz, 1000.0 * raw)
    torch.testing.assert_close(pose, pose_from_parameters(rot, xyz, "quaternion_adjugate"))


def test_adjugate_pose_is_rigid_and_differentiable():
    torch.manual_seed(0)
    model = PoseRegressor("resnet18")
    _randomize_norms(model)
    x = torch.randn(3, 1, SMALL, SMALL)
    pose = model(x)
    R, bottom = pose[:, :3, :3], pose[:, 3]
    eye = torch.eye(3).expand(3, 3, 3)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(bottom, torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(3, 4))

    # A loss on the pose reaches every parameter (the adjugate decoder picks one column of the
    # 4x4 matrix per sample, so only some rows of rot_regression get gradient from a sample).
    target = torch.eye(4).expand(3, 4, 4)
    ((pose - target) ** 2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_normalize_xray():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(3, 1, 40, 50, generator=gen) * 7 + 2
    out = normalize_xray(img, 16)
    assert out.shape == (3, 1, 16, 16) and out.dtype == img.dtype
    # min-max to [0, 1] then (x - 0.15) / 0.1 (resizing stays within the range)
    assert out.min() >= -1.5 - 1e-5 and out.max() <= 8.5 + 1e-5

    # Per-image: scaling/offsetting one image changes nobody's output, including its own.
    img2 = img.clone()
    img2[1] = img2[1] * 100 + 5
    out2 = normalize_xray(img2, 16)
    torch.testing.assert_close(out2, out, atol=1e-4, rtol=1e-4)
    img3 = img.clone()
    img3[1] = torch.rand(1, 40, 50, generator=gen)
    out3 = normalize_xray(img3, 16)
    torch.testing.assert_close(out3[[0, 2]], out[[0, 2]])

    # A constant image gives no NaN.
    const = normalize_xray(torch.full((1, 1, 20, 20), 3.0), 8)
    assert torch.isfinite(const).all()
    torch.testing.assert_close(const, torch.full((1, 1, 8, 8), -1.5))

    # Already at the target size: min-max + affine only; and it matches the explicit pipeline.
    x = img[:, :, :16, :16]
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(normalize_xray(x, 16), ((x - lo) / (hi - lo + 1e-6) - 0.15) / 0.1)
    resized = torch.nn.functional.interpolate(
        (img - img.amin((1, 2, 3), True)) / (img.amax((1, 2, 3), True) - img.amin((1, 2, 3), True) + 1e-6),
        size=(16, 16),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    torch.testing.assert_close(out, (resized - 0.15) / 0.1)

    with pytest.raises(ValueError):
        normalize_xray(torch.rand(16, 16), 8)


def test_default_network():
    cpu, cuda = default_network("cpu"), default_network(torch.device("cuda"))
    assert cpu["model_name"] == "resnet18" and cpu["height"] == 128 and cpu["batch_size"] <= 16
    assert cuda["model_name"] == "resnet34" and cuda["height"] == 128 and cuda["batch_size"] == 116
    for choice in (cpu, cuda, default_network("mps")):
        kwargs = {k: v for k, v in choice.items() if k != "batch_size"}
        assert set(kwargs) <= set(PoseRegressor.__init__.__code__.co_varnames)
        assert kwargs["model_name"] in net.MODEL_NAMES

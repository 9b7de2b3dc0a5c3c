"""Checkpoints: xvr's layout round trip, our metadata, and refusal of unsafe or broken files."""

import collections
import datetime
import math
import os
import pickle

import numpy as np
import pytest
import torch

from xvr_ros.core.model.checkpoint import (
    DEFAULT_CONFIG,
    CheckpointError,
    config_from_model,
    load_checkpoint,
    save_checkpoint,
)
from xvr_ros.core.model.network import PoseRegressor

SMALL = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def xvr_config(**overrides):
    """A config dict as xvr's Trainer records it (``locals()`` of Trainer.__init__, xvreg 0.1.0)."""
    config = dict(
        volpath="/data/ct.nii.gz",
        maskpath=None,
        outpath="/models/out",
        alphamin=-45.0, alphamax=90.0, betamin=-5.0, betamax=5.0, gammamin=-5.0, gammamax=5.0,
        txmin=-25.0, txmax=25.0, tymin=700.0, tymax=800.0, tzmin=-25.0, tzmax=25.0,
        sdd=1020.0,
        height=128,
        delx=2.31,
        orientation="AP",
        reverse_x_axis=False,
        renderer="trilinear",
        parameterization="quaternion_adjugate",
        convention="ZXY",
        model_name="resnet18",
        pretrained=False,
        norm_layer="groupnorm",
        unit_conversion_factor=1000.0,
        p_augmentation=0.333,
        lr=2e-4,
        weight_ncc=1.0, weight_geo=1e-2, weight_dice=1.0, weight_mvc=0,
        batch_size=116,
        n_total_itrs=1_000_000, n_warmup_itrs=1_000, n_grad_accum_itrs=4, n_save_every_itrs=1_000,
        disable_scheduler=False,
        ckptpath=None,
        reuse_optimizer=False,
        warp=None,
        invert=False,
        patch_size=None,
        num_workers=4,
        pin_memory=False,
        weights=None,
    )  # fmt: skip
    config.update(overrides)
    return config


class WarmupCosineSchedule(torch.optim.lr_scheduler.LambdaLR):
    """Shape of xvr's scheduler (a LambdaLR driven by a bound method) for its state dict."""

    def __init__(self, optimizer, warmup_steps, t_total, cycles=0.5):
        self.warmup_steps, self.t_total, self.cycles = warmup_steps, t_total, cycles
        super().__init__(optimizer, self.lr_lambda)

    def lr_lambda(self, step):
        if step < self.warmup_steps:
            return float(step) / max(1.0, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.t_total - self.warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.cycles * 2.0 * progress)))


def trained_model(seed=0, **kwargs):
    """A PoseRegressor with non-trivial weights plus its Adam/scheduler after a few steps."""
    torch.manual_seed(seed)
    model = PoseRegressor(**kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    scheduler = WarmupCosineSchedule(optimizer, 250.0, 250000.0)
    for _ in range(2):
        loss = model(torch.randn(2, 1, SMALL, SMALL))[:, :3, 3].square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model.eval(), optimizer, scheduler


def write_xvr_checkpoint(path, model, optimizer, scheduler, config, itr=3000, model_number=3):
    """Exactly xvr's Trainer._checkpoint."""
    torch.save(
        {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "itr": itr,
            "model_number": model_number,
            "date": datetime.datetime.now(),
            "config": config,
        },
        path,
    )


def light(state_dict):
    """Same keys, shapes and dtypes, but every tensor a broadcast scalar: saves in a few kB."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in state_dict.items()}


def predict(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def trained():
    return trained_model()


@pytest.fixture(scope="module")
def xvr_file(tmp_path_factory, trained):
    path = tmp_path_factory.mktemp("xvr") / "0003.pth"
    write_xvr_checkpoint(path, *trained, xvr_config())
    return path


def test_xvr_checkpoint_round_trip(tmp_path, trained, xvr_file):
    model, optimizer, scheduler = trained
    x = torch.randn(2, 1, SMALL, SMALL)

    ckpt = load_checkpoint(xvr_file)
    assert not ckpt.model.training
    assert ckpt.config == xvr_config()
    assert ckpt.metadata == {}
    assert ckpt.itr == 3000 and ckpt.model_number == 3
    assert isinstance(ckpt.date, datetime.datetime)
    assert set(ckpt.raw) >= {"optimizer_state_dict", "scheduler_state_dict"}
    torch.testing.assert_close(predict(ckpt.model, x), predict(model, x), rtol=0, atol=0)

    # The raw optimizer/scheduler state resumes training (xvr's order: build both, then load).
    opt2 = torch.optim.Adam(ckpt.model.parameters(), lr=2e-4)
    sched2 = WarmupCosineSchedule(opt2, 250.0, 250000.0)
    opt2.load_state_dict(ckpt.raw["optimizer_state_dict"])
    sched2.load_state_dict(ckpt.raw["scheduler_state_dict"])
    assert sched2.last_epoch == scheduler.last_epoch
    assert opt2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

    # Save with our writer and reload: same predictions, metadata round trip.
    metadata = {
        "volume": {"path": "/data/ct.nii.gz", "sha256": "ab" * 32},
        "labels": [1, 2, 3],
        "preset": "neuro",
        "ranges": {"alpha": (-45.0, 90.0), "ty": (700.0, 800.0)},
        "intrinsics": {"sdd": 1020.0, "delx": 2.31, "height": 128},
        "network": {"model_name": "resnet18", "height": 128},
        "steps": 12,
        "wall_time_s": 12.5,
        "patient_to_template": torch.eye(4, dtype=torch.float64),
        "validation": {"mtre_mm": [1.0, 2.5], "covariance": torch.eye(6) * 0.5, "note": None, "ok": True},
    }
    out = save_checkpoint(
        tmp_path / "ours.pth",
        ckpt.model,
        ckpt.config,
        metadata=metadata,
        optimizer=opt2,
        scheduler=sched2,
        itr=ckpt.itr,
        model_number=4,
    )
    again = load_checkpoint(out)
    torch.testing.assert_close(predict(again.model, x), predict(model, x), rtol=0, atol=0)
    assert again.config == ckpt.config
    assert again.itr == 3000 and again.model_number == 4
    assert again.metadata.keys() == metadata.keys()
    torch.testing.assert_close(again.metadata["patient_to_template"], metadata["patient_to_template"])
    torch.testing.assert_close(again.metadata["validation"]["covariance"], torch.eye(6) * 0.5)
    for key in ("volume", "labels", "preset", "ranges", "intrinsics", "network", "steps", "wall_time_s"):
        assert again.metadata[key] == metadata[key]
    assert again.metadata["validation"]["mtre_mm"] == [1.0, 2.5]

    # Our file has exactly xvr's keys plus ours, so xvr's load_model reads it.
    with torch.serialization.safe_globals([datetime.datetime]):
        raw = torch.load(out, weights_only=True, mmap=True)
    assert set(raw) == {
        "model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
        "itr", "model_number", "date", "config", "xvr_ros",
    }  # fmt: skip
    assert isinstance(raw["date"], datetime.datetime)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left


def test_batchnorm_and_other_heads_round_trip(tmp_path):
    model, _, _ = trained_model(seed=1, model_name="resnet18", norm_layer="batchnorm", parameterization="rotation_6d")
    x = torch.randn(1, 1, SMALL, SMALL)
    config = config_from_model(model, sdd=1020.0, delx=2.31)
    assert config["model_name"] == "resnet18" and config["norm_layer"] == "batchnorm"
    assert config["lr"] == DEFAULT_CONFIG["lr"] and config["reverse_x_axis"] is False
    path = save_checkpoint(tmp_path / "bn.pth", model, config)
    ckpt = load_checkpoint(path)
    assert ckpt.model.rot_regression.out_features == 6
    torch.testing.assert_close(predict(ckpt.model, x), predict(model, x), rtol=0, atol=0)
    torch.testing.assert_close(
        ckpt.model.state_dict()["backbone.bn1.running_var"], model.state_dict()["backbone.bn1.running_var"]
    )
    assert ckpt.raw["optimizer_state_dict"] is None


def test_legacy_config_fallbacks(tmp_path, trained):
    # Pre-0.1 xvr: "epoch" instead of "itr", no model_number / norm_layer / unit_conversion_factor.
    model = trained[0]
    config = xvr_config()
    del config["norm_layer"], config["unit_conversion_factor"]
    torch.save({"model_state_dict": model.state_dict(), "epoch": 7, "date": datetime.datetime.now(), "config": config},
               tmp_path / "old.pth")  # fmt: skip
    ckpt = load_checkpoint(tmp_path / "old.pth")
    assert ckpt.itr == 7 and ckpt.model_number is None
    assert ckpt.model.norm_layer == "groupnorm" and ckpt.model.unit_conversion_factor == 1.0


def test_save_rejects_conflicts_and_unsafe_values(tmp_path, trained):
    model = trained[0]
    with pytest.raises(CheckpointError, match="model_name"):
        save_checkpoint(tmp_path / "a.pth", model, xvr_config(model_name="resnet34"))
    bad = [
        ({"cov": np.eye(6)}, "numpy"),
        ({"x": np.float64(1.0)}, "numpy"),  # a float subclass: would pickle as numpy
        ({"p": __import__("pathlib").Path("/tmp")}, "str\\(path\\)"),
        ({"d": datetime.datetime.now(datetime.timezone.utc)}, "timezone"),
        ({"s": {1, 2}}, "set"),
        ({"f": collections.defaultdict(list)}, "defaultdict"),
    ]
    for metadata, match in bad:
        with pytest.raises(CheckpointError, match=match):
            save_checkpoint(tmp_path / "b.pth", model, xvr_config(), metadata=metadata)
    assert not list(tmp_path.iterdir())  # nothing written, no temp files


# ------------------------------------------------------------------------------- safety
class Payload(collections.OrderedDict):
    """An OrderedDict subclass: harmless here, but not something a weights-only loader may build."""


class Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_refuses_arbitrary_globals(tmp_path, trained, legacy):
    zipped = not legacy
    path = tmp_path / "evil.pth"

    state = Payload(light(trained[0].state_dict()))
    torch.save({"model_state_dict": state, "config": xvr_config()}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match=r"disallowed global.*Payload") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)

    marker = tmp_path / "pwned"
    torch.save({"config": xvr_config(), "model_state_dict": {}, "x": Exploit(marker)}, path,
               _use_new_zipfile_serialization=zipped)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"disallowed global.*system"):
        load_checkpoint(path)
    assert not marker.exists()  # nothing was executed

    # numpy arrays (a common accident) are named too
    torch.save({"config": xvr_config(), "model_state_dict": {}, "a": np.zeros(3)}, path,
               _use_new_zipfile_serialization=zipped)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"disallowed global.*numpy"):
        load_checkpoint(path)


def test_corrupt_files(tmp_path, xvr_file):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)

    data = xvr_file.read_bytes()
    for name, blob in [
        ("truncated.pth", data[: len(data) // 2]),
        ("head.pth", data[:100]),
        ("random.pth", np.random.default_rng(0).bytes(4096)),
        ("empty.pth", b""),
        ("text.pth", b"hello, not a checkpoint\n" * 10),
        ("pickle.pth", pickle.dumps({"config": {}}, protocol=2)),
    ]:
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


def test_structural_errors(tmp_path, trained):
    sd = light(trained[0].state_dict())
    path = tmp_path / "x.pth"

    def check(obj, match):
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match=match) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)
        return str(err.value)

    check([1, 2, 3], "expected a dict")
    check({"model_state_dict": sd}, r"missing key\(s\) \['config'\]")
    check({"config": xvr_config()}, r"missing key\(s\) \['model_state_dict'\]")
    check({"config": {"height": 128}, "model_state_dict": sd}, "model_name")
    check({"config": xvr_config(model_name="vit_base"), "model_state_dict": sd}, "Unknown model_name 'vit_base'")
    check({"config": xvr_config(parameterization="rotation_10d"), "model_state_dict": sd}, "rotation_10d")

    # State-dict mismatches list a few keys.
    missing = {k: v for k, v in sd.items() if not k.startswith("backbone.layer4")}
    msg = check({"config": xvr_config(), "model_state_dict": missing}, "missing keys")
    assert "backbone.layer4.0.conv1.weight" in msg and "more)" in msg
    extra = dict(sd, **{"backbone.fc.weight": torch.zeros(1000, 512)})
    check({"config": xvr_config(), "model_state_dict": extra}, r"unexpected keys \(1\): backbone.fc.weight")
    check({"config": xvr_config(model_name="resnet34"), "model_state_dict": sd}, "missing keys.*layer1.2")
    check({"config": xvr_config(parameterization="quaternion"), "model_state_dict": sd},
          r"shape mismatches.*rot_regression")  # fmt: skip
    check({"config": xvr_config(norm_layer="batchnorm"), "model_state_dict": sd}, "missing keys.*running_mean")

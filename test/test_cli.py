import nibabel as nib
import numpy as np
from PIL import Image

from xvr_ros.cli import main


def write_phantom(path):
    hu = np.full((32, 32, 24), -1000, dtype=np.int16)
    hu[8:24, 10:22, 6:18] = 0  # a block of water
    hu[14:18, 14:18, 8:16] = 1200  # with a bone rod inside
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.5, 1.0])), path)


def test_render_writes_png(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    write_phantom(ct)
    out = tmp_path / "drr.png"
    args = ["render", "--volume", str(ct), "--pose", "0", "0", "0", "0", "600", "0", "--height", "48", "--delx", "2.0", "--out", str(out)]
    assert main(args) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (48, 48) and img.dtype == np.uint8
    # The bone rod is the brightest structure and it projects near the image centre.
    r, c = np.unravel_index(np.argmax(img), img.shape)
    assert abs(r - 24) < 8 and abs(c - 24) < 8
    assert img[0, 0] == 0  # air around the phantom
    assert "wrote" in capsys.readouterr().out


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    args = ["render", "--volume", str(tmp_path / "missing.nii.gz"), "--pose", "0", "0", "0", "0", "600", "0", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_train_then_summary(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    write_phantom(ct)
    out = tmp_path / "model.pth"
    args = ["train", "--volume", str(ct), "--preset", "chest", "--range", "y", "600", "700", "--max-steps", "2",
            "--height", "32", "--delx", "8", "--batch-size", "2", "--no-ncc", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "mTRE median" in printed.out and "steps" in printed.out
    assert "step 2" in printed.err  # the progress bar
    from xvr_ros.core.checkpoint import load_checkpoint

    meta = load_checkpoint(out).metadata
    assert meta["ranges"]["y"] == [600.0, 700.0] and meta["preset"] == "chest"


def test_train_must_be_bounded(tmp_path, capsys):
    assert main(["train", "--volume", "ct.nii", "--out", str(tmp_path / "m.pth")]) == 2
    assert "--time-budget" in capsys.readouterr().err

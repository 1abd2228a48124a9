"""`fusenet predict` scales image files exactly as the training data was scaled
(the pixel scale recorded in the checkpoint), says what it converted, and goes on
past an unreadable image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.training import checkpoint as C
from engine.training import data as D
from train_specs import DIGITS_SPEC, compile


@pytest.fixture(scope="module")
def float255_run(tmp_path_factory):
    """A model trained on an .npz of float pixels in 0..255 (not [0, 1]), and ten of its images as PNG."""
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("float255")
    digits = load_digits()
    x = np.round(digits.images * 255.0 / 16.0).astype(np.float32)  # 0..255, whole numbers: PNG holds them exactly
    np.savez(d / "digits255.npz", x=x, y=digits.target)
    (d / "d.cnn").write_text(DIGITS_SPEC)
    assert main(["train", str(d / "d.cnn"), "--backend", "torch", "--data", str(d / "digits255.npz"),
                 "--epochs", "3", "--out", str(d / "run")]) == 0
    pngs = []
    for i in range(10):
        p = d / f"img{i}.png"
        Image.fromarray(x[i].astype(np.uint8), mode="L").save(p)
        pngs.append(str(p))
    return d, x[:10], pngs


def _expected_top(d, x: np.ndarray) -> list[int]:
    """What the trained model answers for the training-data form of the same images."""
    model = compile((d / "d.cnn").read_text())
    ck = C.load_checkpoint(d / "run" / "model.safetensors")
    C.load_into_model(ck, model, model.name)
    model.eval()
    meta = ck.meta["data"]
    xt = D.normalise_images(torch.from_numpy(x)[:, None], meta["mean"], meta["std"])
    with torch.no_grad():
        return model(xt).argmax(1).tolist()


def test_checkpoint_records_the_pixel_scale(float255_run):
    d, _, _ = float255_run
    meta = C.load_checkpoint(d / "run" / "model.safetensors").meta["data"]
    assert meta["pixel_scale"] == 255.0 and meta["pixel_range"] == [0.0, 255.0]


def test_predict_on_png_matches_the_model_on_training_data(float255_run, capsys):
    d, x, pngs = float255_run
    ck = str(d / "run" / "model.safetensors")
    assert main(["predict", str(d / "d.cnn"), "--backend", "torch", "--checkpoint", ck, "--top", "1", *pngs]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    got = [int(line.split(": ")[1].split()[0]) for line in lines]
    assert got == _expected_top(d, x)
    assert len(set(got)) > 3  # before the fix every image got the same answer ("1 84.4%")


def test_predict_warns_about_conversions_and_goes_on_past_a_bad_image(float255_run, tmp_path, capsys):
    d, _, pngs = float255_run
    ck = str(d / "run" / "model.safetensors")
    big = tmp_path / "big_rgba.png"
    Image.fromarray(np.full((64, 64, 4), 200, np.uint8), mode="RGBA").save(big)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    argv = ["predict", str(d / "d.cnn"), "--backend", "torch", "--checkpoint", ck, "--batch", "2",
            pngs[0], str(big), str(broken), str(deep)]
    assert main(argv) == 1
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    assert [line.split(":")[0] for line in out] == [pngs[0], str(big), str(deep)]  # broken.png skipped, the rest done
    assert f"{broken}: error: cannot read image" in cap.err
    assert "1 of 4 image(s) could not be read" in cap.err
    assert "converted from RGBA to grey" in cap.err and "alpha channel is dropped" in cap.err
    assert "resized from 64x64 to 8x8" in cap.err
    assert "16-bit grey image scaled" in cap.err


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(p)
    img, notes = D.read_image(p, (1, 4, 4))
    assert torch.allclose(img, torch.full((1, 4, 4), 32768 / 65535))
    assert notes and "16-bit" in notes[0]


def test_input_scaling_from_an_old_checkpoint_is_unchanged():
    s = D.InputScaling.from_meta({"mean": [0.5], "std": [0.25]})
    x = torch.ones(1, 1, 2, 2)
    assert torch.equal(s.apply(x), torch.full((1, 1, 2, 2), 2.0))

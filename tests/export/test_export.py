"""`fusenet export`: standalone PyTorch source and ONNX, checked against fusenet's own outputs."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.cli import main
from engine.training.checkpoint import save_checkpoint
from engine.training.init import init_weights

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))


def _trained_like(model, seed: int = 0):
    """Weights and batch-norm statistics that are not the defaults, as after training."""
    init_weights(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model.eval()


def _checkpoint(model, path: Path) -> Path:
    save_checkpoint(path, model, network=model.name, spec=model.source_text, epoch=1,
                    data={"mean": [0.5] * model.input_shape[0], "std": [0.25] * model.input_shape[0],
                          "classes": [], "pixel_scale": 1.0})
    return path


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k[len("model."):]: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_torch_source_matches_fusenet_for_every_example(path, tmp_path, capsys):
    model = _trained_like(engine.compile(path, backend="torch"))
    ck = _checkpoint(model, tmp_path / "model.safetensors")
    out = tmp_path / f"{path.stem}_model.py"
    assert main(["export", str(path), "--torch", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    source = out.read_text()
    assert "fusenet" not in source.split('"""', 2)[2], "the generated module must not use fusenet"
    compile(source, str(out), "exec")
    mod = _import(out)
    cls = next(v for k, v in vars(mod).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
               and v is not torch.nn.Module)
    net = cls()
    net.load_state_dict(_load_state(ck), strict=True)  # the same state-dict keys, the same shapes
    assert list(net.state_dict()) == list(model.state_dict())
    net.eval()
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_source_runs_in_a_python_without_fusenet(tmp_path):
    out = tmp_path / "digits_model.py"
    assert main(["export", "examples/digits.cnn", "--torch", str(out)]) == 0
    code = ("import sys\n"
            "sys.modules['engine'] = sys.modules['dsl'] = None  # importing fusenet would fail\n"
            f"sys.path.insert(0, {str(tmp_path)!r})\n"
            "import torch, digits_model\n"
            "print(tuple(digits_model.Digits().eval()(torch.zeros(3, 1, 8, 8)).shape))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(3, 10)"


def test_torch_source_of_a_blurpool_network(tmp_path):
    spec = tmp_path / "b.cnn"
    spec.write_text("network b {\n    input 3x8x8\n    conv 4 kernel=3 pad=1 -> relu\n    blurpool stride=2\n"
                    "    global_avgpool\n    linear 3\n}\n")
    model = _trained_like(engine.compile(spec, backend="torch"))
    out = tmp_path / "b_model.py"
    assert main(["export", str(spec), "--torch", str(out)]) == 0
    net = _import(out).B()
    net.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(net.eval()(x), model(x), rtol=1e-5, atol=1e-5)


onnxruntime = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")


@pytest.mark.parametrize("name, backend", [("digits", "triton"), ("unet_tiny", "torch")])
def test_onnx_runs_in_onnxruntime_like_fusenet(name, backend, tmp_path, capsys):
    path = ROOT / "examples" / f"{name}.cnn"
    ref = _trained_like(engine.compile(path, backend="torch"))
    ck = _checkpoint(ref, tmp_path / "model.safetensors")
    out = tmp_path / f"{name}.onnx"
    assert main(["export", str(path), "--checkpoint", str(ck), "--onnx", str(out)]) == 0
    assert "batch dimension dynamic" in capsys.readouterr().out
    ours = engine.compile(path, backend=backend)  # fusenet's output: its Triton kernels where cheap enough here
    ours.load_state_dict(_load_state(ck))
    ours.eval()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["fusenet.network"] == name and "fusenet.input_mean" in meta
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, *ours.input_shape, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = ours(x).float().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_export_errors_are_clear(tmp_path, capsys):
    assert main(["export", "examples/digits.cnn"]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main(["export", "examples/digits.cnn", "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["export", "examples/digits.cnn", "--torch", "/dev/null/x.py"]) == 1
    assert "cannot write '/dev/null/x.py'" in capsys.readouterr().err
    assert main(["export", "examples/digits.cnn", "--checkpoint", str(tmp_path / "none"), "--onnx", "x.onnx"]) == 1
    assert "does not exist" in capsys.readouterr().err

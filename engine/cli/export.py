"""`fusenet export FILE`: the network out of fusenet.

- `--onnx OUT.onnx --checkpoint C`: the trained network with its weights as an
  ONNX file, exported through the reference backend (engine.export.onnx_file);
  the input normalisation and class names go into its metadata;
- `--torch OUT.py`: standalone, readable PyTorch source with the same
  state-dict keys (engine.export.torch_source); with --checkpoint, the
  checkpoint is first checked against the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.cli.common import input_path, load_trained
from engine.errors import InputFileError, UsageError


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise InputFileError(f"cannot write '{path}': {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _metadata(ck) -> dict[str, str]:
    data = ck.meta.get("data", {}) if isinstance(ck.meta.get("data"), dict) else {}
    meta = {"fusenet.network": ck.network, "fusenet.epoch": str(ck.epoch)}
    for key in ("mean", "std", "classes", "pixel_scale"):
        if key in data:
            meta[f"fusenet.input_{key}" if key in ("mean", "std") else f"fusenet.{key}"] = json.dumps(data[key])
    return meta


def cmd_export(args) -> int:
    if not args.onnx and not args.torch:
        raise UsageError("say what to write: --onnx OUT.onnx (with --checkpoint) and/or --torch OUT.py")
    if args.onnx and not args.checkpoint:
        raise UsageError("--onnx writes a trained network: give its --checkpoint (a model.safetensors)")
    for flag, out, suffix in (("--onnx", args.onnx, ".onnx"), ("--torch", args.torch, ".py")):
        if out and Path(out).is_dir():
            raise UsageError(f"{flag} takes a file name ending in {suffix}; '{out}' is a folder")
    spec_path = input_path(args.file)
    model = ck = None
    if args.checkpoint:
        model, ck = load_trained(spec_path, args.checkpoint, "torch")
    if args.torch:
        import engine
        from engine.export.torch_source import class_name, torch_source

        spec = engine.load(Path(spec_path))
        out = Path(args.torch)
        _write_text(out, torch_source(spec, Path(spec_path).name))
        print(f"wrote {out}: class {class_name(spec.graph.name)}(nn.Module), plain PyTorch, the same "
              f"state-dict keys as fusenet's '{spec.graph.name}'")
    if args.onnx:
        from engine.export.onnx_file import write_onnx

        out = write_onnx(model, args.onnx, _metadata(ck))
        data = ck.meta.get("data", {}) if isinstance(ck.meta.get("data"), dict) else {}
        note = ""
        if data.get("mean"):
            note = (f"; its input is N x {'x'.join(map(str, model.input_shape))}, normalised as in training: "
                    f"(pixel - mean) / std with mean {[round(v, 4) for v in data['mean']]}, "
                    f"std {[round(v, 4) for v in data['std']]} (also in the file's metadata)")
        print(f"wrote {out}: network '{model.name}' with the weights of {args.checkpoint} "
              f"(epoch {ck.epoch}), batch dimension dynamic{note}")
    return 0


def add_commands(sub) -> None:
    """Register export on an argparse subparsers object."""
    p = sub.add_parser("export", help="write a network as ONNX (with its weights) or as plain PyTorch source",
                       description="Write the network of FILE out of fusenet: --onnx with a checkpoint's weights "
                                   "(through the PyTorch reference backend; needs pip install 'fusenet[onnx]'), "
                                   "--torch as a standalone nn.Module whose state-dict keys match fusenet's.")
    p.add_argument("file", help="a network spec (.cnn); examples/NAME.cnn also finds the shipped examples")
    p.add_argument("--checkpoint", help="a model.safetensors written by fusenet train (needed for --onnx)")
    p.add_argument("--onnx", metavar="OUT.onnx", help="write the trained network as an ONNX file")
    p.add_argument("--torch", metavar="OUT.py", help="write standalone PyTorch source for the network")
    p.set_defaults(func=cmd_export)

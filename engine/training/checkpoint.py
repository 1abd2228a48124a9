"""Checkpoints: one safetensors file, written atomically, read without pickle.

Layout of `model.safetensors`:
- tensors `model.<state_dict key>` (weights and buffers), `optim.<param index>.<name>`
  (optimizer state tensors), `rng.<name>` (generator states as uint8 tensors);
- metadata (strings): `format` = "fusenet-checkpoint-1", `network`, `spec` (the spec
  text), `epoch`, and JSON strings `optim_groups` (hyper-parameters per group),
  `optim_scalars` (non-tensor optimizer state), `train_state` (schedule, early
  stopping and history), `data` (data set name, classes, normalisation, pixel
  scale), and `sha256`: a checksum of every tensor (name, dtype, shape, bytes),
  verified on load, so flipped bits on disk are an error rather than a silently
  wrong model.

A save goes to a temporary file in the same folder, is fsynced, then renamed over
the old file: a kill at any moment leaves either the old or the new checkpoint.
A kill between the two leaves the temporary file (`.model.safetensors.tmp-PID`);
`remove_stale_temporaries` deletes those whose process is gone.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import CheckpointError

FORMAT = "fusenet-checkpoint-1"


@dataclass
class Checkpoint:
    path: str
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # decoded metadata

    @property
    def network(self) -> str:
        return self.meta.get("network", "")

    @property
    def epoch(self) -> int:
        return int(self.meta.get("epoch", 0))


def _json_safe(v):
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return repr(v)
    return v


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode(model_state: dict[str, torch.Tensor], *, network: str, spec: str, epoch: int,
           optimizer: torch.optim.Optimizer | None = None, rng: dict[str, torch.Tensor] | None = None,
           train_state: dict | None = None, data: dict | None = None) -> bytes:
    """Serialise a checkpoint to safetensors bytes."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for k, v in model_state.items():
        tensors[f"model.{k}"] = v.detach().to("cpu").clone().contiguous()
    meta = {"format": FORMAT, "network": network, "spec": spec, "epoch": str(int(epoch))}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for pid, st in sd["state"].items():
            for name, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"optim.{pid}.{name}"] = val.detach().to("cpu").clone().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[name] = _json_safe(val)
        meta["optim_groups"] = json.dumps(_json_safe(sd["param_groups"]))
        meta["optim_scalars"] = json.dumps(scalars)
        meta["optim_class"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    for k, v in (rng or {}).items():
        tensors[f"rng.{k}"] = v.detach().to("cpu").clone().contiguous()
    meta["train_state"] = json.dumps(_json_safe(train_state or {}))
    meta["data"] = json.dumps(_json_safe(data or {}))
    meta["sha256"] = tensors_checksum(tensors)
    return save(tensors, metadata=meta)


def write_atomic(path: str | Path, blob: bytes) -> None:
    """Write bytes so that `path` holds either its old or its new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete `.NAME.tmp-PID` files (interrupted atomic writes) whose process no longer runs;
    the paths removed. A live writer's file (another run in the same folder) is left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        m = _TEMPORARY.match(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def save_checkpoint(path: str | Path, model: torch.nn.Module, **kw) -> None:
    """Atomically save `model.state_dict()` plus what `encode` takes (network, spec, epoch, ...)."""
    write_atomic(path, encode(model.state_dict(), **kw))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; a clear CheckpointError for anything wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a safetensors file ({type(e).__name__}: {e}); "
            "it was not written completely or is not a fusenet checkpoint") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' is not a fusenet checkpoint (format {raw.get('format')!r}, expected {FORMAT!r})")
    if "sha256" in raw and tensors_checksum(tensors) != raw["sha256"]:
        raise CheckpointError(
            f"checkpoint '{path}' is damaged: its tensors do not match the checksum recorded when it was saved "
            "(changed on disk after fusenet wrote it); use another checkpoint or retrain")
    meta = _decode_metadata(raw, path)
    ck = Checkpoint(str(path), {}, {}, {}, meta)
    for k, v in tensors.items():
        group, _, name = k.partition(".")
        {"model": ck.model, "optim": ck.optim, "rng": ck.rng}.get(group, {})[name] = v
    return ck


_JSON_FIELDS = {"optim_groups": list, "optim_scalars": dict, "train_state": dict, "data": dict}


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """The metadata with its JSON fields decoded and typed; a CheckpointError naming the field otherwise."""
    meta: dict[str, Any] = dict(raw)
    for k, kind in _JSON_FIELDS.items():
        if k not in raw:
            continue
        try:
            meta[k] = json.loads(raw[k])
        except ValueError as e:
            raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: '{k}' is not valid JSON ({e})") from None
        if not isinstance(meta[k], kind):
            raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: '{k}' should be a JSON "
                                  f"{'list' if kind is list else 'object'}, not {type(meta[k]).__name__}")
    epoch = raw.get("epoch", "0")
    if not epoch.isdigit():
        raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: epoch {epoch!r} is not a whole number")
    meta["epoch"] = int(epoch)
    data = meta.get("data", {})
    for k in ("mean", "std", "classes", "pixel_range"):
        if k in data and not isinstance(data[k], list):
            raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: data.{k} should be a list")
    for k in ("mean", "std", "pixel_range"):
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in data.get(k, [])):
            raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: data.{k} should hold numbers")
    if "pixel_scale" in data and (isinstance(data["pixel_scale"], bool) or
                                  not isinstance(data["pixel_scale"], (int, float)) or not data["pixel_scale"] > 0):
        raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: data.pixel_scale should be a positive number")
    if not isinstance(meta.get("train_state", {}).get("history", []), list):
        raise CheckpointError(f"checkpoint '{path}' has corrupt metadata: train_state.history should be a list")
    return meta


def check_matches(ck: Checkpoint, model: torch.nn.Module, network: str) -> None:
    """Refuse a checkpoint of another network: names, keys and shapes must all agree."""
    if ck.network and network and ck.network != network:
        raise CheckpointError(
            f"checkpoint '{ck.path}' is of network '{ck.network}', not '{network}'")
    sd = model.state_dict()
    missing = [k for k in sd if k not in ck.model]
    extra = [k for k in ck.model if k not in sd]
    shapes = [f"{k}: checkpoint {list(ck.model[k].shape)} vs network {list(v.shape)}"
              for k, v in sd.items() if k in ck.model and tuple(ck.model[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        parts = []
        if shapes:
            parts.append("shape differences: " + "; ".join(shapes[:4]) + (" ..." if len(shapes) > 4 else ""))
        if missing:
            parts.append("missing in checkpoint: " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if extra:
            parts.append("not in network: " + ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))
        raise CheckpointError(
            f"checkpoint '{ck.path}' does not match network '{network}' (was the spec changed?): " + "; ".join(parts))


def load_into_model(ck: Checkpoint, model: torch.nn.Module, network: str) -> None:
    check_matches(ck, model, network)
    model.load_state_dict({k: ck.model[k] for k in model.state_dict()}, strict=True)


def _restore(v):
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def load_into_optimizer(ck: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    """Restore optimizer state saved by `encode` (refusing a different optimizer or group layout)."""
    groups = ck.meta.get("optim_groups")
    if groups is None:
        raise CheckpointError(f"checkpoint '{ck.path}' holds no optimizer state; it cannot be resumed")
    cls = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    saved_cls = ck.meta.get("optim_class", cls)
    if saved_cls.rsplit(".", 1)[-1] != cls.rsplit(".", 1)[-1]:
        raise CheckpointError(
            f"checkpoint '{ck.path}' was trained with optimizer {saved_cls}, this run uses {cls}")
    cur = optimizer.state_dict()["param_groups"]
    if len(cur) != len(groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(cur, groups)):
        raise CheckpointError(
            f"checkpoint '{ck.path}': optimizer parameter groups differ from this run's (changed freeze list?)")
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        for k, v in list(g.items()):
            g[k] = _restore(v)
    state: dict[int, dict] = {}
    for k, v in ck.optim.items():
        pid, _, name = k.partition(".")
        state.setdefault(int(pid), {})[name] = v
    for pid, d in ck.meta.get("optim_scalars", {}).items():
        state.setdefault(int(pid), {}).update({k: _restore(v) for k, v in d.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def init_from(ck: Checkpoint, model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Copy layers whose tensors all match by name and shape (transfer learning); a layer
    with any mismatching tensor is skipped whole. Returns (loaded keys, skipped keys with reasons)."""
    sd = model.state_dict()
    layers: dict[str, list[str]] = {}
    for k in sd:
        layers.setdefault(k.rpartition(".")[0], []).append(k)
    loaded, skipped, new = [], [], {}
    for keys in layers.values():
        why = {}
        for k in keys:
            src = ck.model.get(k)
            if src is None:
                why[k] = "absent"
            elif tuple(src.shape) != tuple(sd[k].shape):
                why[k] = f"shape {list(src.shape)} vs {list(sd[k].shape)}"
        if why:
            skipped += [f"{k} ({why.get(k, 'rest of its layer differs')})" for k in keys]
        else:
            new.update({k: ck.model[k].to(sd[k].dtype) for k in keys})
            loaded += keys
    model.load_state_dict(new, strict=False)
    return loaded, skipped

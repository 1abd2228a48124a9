"""The results document of `fusenet bench`, and its three views: terminal
tables, JSON and PNG charts.

A document is plain JSON-ready data:
    {"kind": "fusenet-bench", "version": 1, "created": ISO time,
     "device": devices.device_info(), "command": [...],
     "networks": [row, ...],   # network.bench_network rows
     "layers": [row, ...]}     # layers.bench_layers rows
Speedups are derived when formatting: a baseline's median time over fusenet's
for the same network, batch, precision, mode and CUDA graphs setting, so
"1.5x" means fusenet is 1.5 times faster and "0.7x" means it is slower.
Rows whose output check failed are shown as MISMATCH and get no speedup.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from engine.text import format_table

KIND, VERSION = "fusenet-bench", 1
CPU_CAVEAT = ("CPU run: fusenet's kernels ran in Triton's interpreter. These numbers test the harness; "
              "they are not a benchmark.")
MODE_LABEL = {"forward": "forward (inference)", "step": "training step"}


def new_document(device: dict, command: list[str] | None = None) -> dict:
    return {"kind": KIND, "version": VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device, "command": command or [], "networks": [], "layers": []}


def load(path: str | Path) -> dict:
    """Read a results document; ValueError with the path and what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable results file ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ValueError(f"{path}: not a fusenet bench results file (no \"kind\": \"{KIND}\")")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: results version {doc.get('version')}, this fusenet reads version {VERSION}")
    return doc


def save(doc: dict, path: str | Path) -> None:
    """Write atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for sharing
    os.replace(tmp, path)


def _check_ok(row: dict) -> bool:
    return row.get("check", {}).get("ok", True)


def _ok(row: dict) -> bool:
    return "error" not in row and _check_ok(row)


def failed_checks(doc: dict) -> list[dict]:
    """The rows whose output disagreed with fusenet's (or cuDNN's) beyond tolerance."""
    return [r for r in doc["networks"] + doc["layers"] if not _check_ok(r)]


def speedups(rows: list[dict]) -> dict[tuple, float]:
    """(network, batch, precision, mode, graphs, contender) -> baseline ms / fusenet ms."""
    ours = {(r["network"], r["batch"], r["precision"], r["mode"], r["graphs"]): r["ms"]
            for r in rows if r["contender"] == "fusenet" and _ok(r)}
    out = {}
    for r in rows:
        key = (r["network"], r["batch"], r["precision"], r["mode"], r["graphs"])
        if r["contender"] != "fusenet" and _ok(r) and key in ours:
            out[key + (r["contender"],)] = r["ms"] / ours[key]
    return out


def format_networks(doc: dict) -> str:
    rows = doc["networks"]
    ratio = speedups(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["network"], r["precision"], r["mode"], r["batch"])].append(r)
    out = []
    for (net, prec, mode, batch), group in groups.items():
        out.append(f"{net}  {MODE_LABEL.get(mode, mode)}  batch {batch}  {prec}")
        body = []
        for r in group:
            graphs = "yes" if r["graphs"] else "no"
            if "error" in r:
                body.append((r["label"], graphs, "failed", "", "", "", "", r["error"][:60]))
                continue
            key = (net, batch, prec, mode, r["graphs"], r["contender"])
            check = r.get("check", {})
            verdict = ("reference" if r["contender"] == "fusenet" else
                       (f"ok {check.get('rel_err', 0):.1e}" if check.get("ok", True)
                        else f"MISMATCH {check.get('rel_err', float('nan')):.1e}"))
            body.append((r["label"], graphs, f"{r['ms']:.3f}", f"{r['images_per_s']:,.0f}", f"{r['tflops']:.2f}",
                         "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                         f"{ratio[key]:.2f}x" if key in ratio else "-", verdict))
        out += format_table(("contender", "graphs", "ms", "img/s", "TFLOP/s", "MFU", "fusenet speedup", "check"), body,
                            align="lr").splitlines()
        out.append("")
    return "\n".join(out).rstrip()


def format_layers(doc: dict) -> str:
    body = []
    for r in doc["layers"]:
        if "error" in r:
            body.append((r["shape"], r["op"], "failed", "", "", "", "", "", r["error"][:60]))
            continue
        f, c, check = r["fusenet"], r["cudnn"], r["check"]
        body.append((r["shape"], r["op"], f"{f['ms']:.3f}", f"{f['tflops']:.1f}", f"{f['gb_per_s']:.0f}",
                     f"{c['ms']:.3f}", f"{c['tflops']:.1f}", f"{r['speedup']:.2f}x",
                     "ok" if check["ok"] else f"MISMATCH {check['rel_err']:.1e}"))
    if not body:
        return ""
    prec = doc["layers"][0]["precision"]
    head = (f"per-layer, {prec}: fusenet against cuDNN (unfused PyTorch for fused groups); "
            "speedup = their ms / ours")
    return "\n".join([head, format_table(("layer", "op", "ms", "TFLOP/s", "GB/s", "cuDNN ms", "cuDNN TFLOP/s",
                                           "speedup", "check"), body, align="llr")])


def format_document(doc: dict) -> str:
    dev = doc["device"]
    head = (f"device: {dev.get('name')}  torch {dev.get('torch')}  triton {dev.get('triton')}"
            + (f"  CUDA {dev['cuda']}" if dev.get("cuda") else ""))
    parts = [head]
    if dev.get("type") == "cpu":
        parts.append(CPU_CAVEAT)
    if doc["networks"]:
        parts.append(format_networks(doc))
    if doc["layers"]:
        parts.append(format_layers(doc))
    bad = failed_checks(doc)
    if bad:
        parts.append(f"WARNING: {len(bad)} result(s) failed the output check against fusenet/cuDNN: their "
                     "times are not comparisons (see 'check').")
    return "\n\n".join(parts)


def plot(doc: dict, out_dir: str | Path) -> list[Path]:
    """PNG charts: images/s per network (one panel per mode, bars per contender
    and graphs setting, groups per batch), and per-layer TFLOP/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_net: dict[tuple, list[dict]] = defaultdict(list)
    for r in doc["networks"]:
        if "error" not in r:
            by_net[(r["network"], r["precision"])].append(r)
    device = doc["device"].get("name", "?")
    if doc["device"].get("type") == "cpu":
        device += " (Triton interpreter: harness test data, not a benchmark)"
    for (net, prec), rows in by_net.items():
        modes = [m for m in ("forward", "step") if any(r["mode"] == m for r in rows)]
        fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            mrows = [r for r in rows if r["mode"] == mode]
            batches = sorted({r["batch"] for r in mrows})
            series = list(dict.fromkeys((r["label"], r["graphs"]) for r in mrows))
            width = 0.8 / max(1, len(series))
            for j, (label, graphs) in enumerate(series):
                vals = [next((r["images_per_s"] for r in mrows if r["batch"] == b and r["label"] == label
                              and r["graphs"] == graphs), 0.0) for b in batches]
                ax.bar([i + j * width for i in range(len(batches))], vals, width,
                       label=label + (" + CUDA graphs" if graphs else ""), hatch="//" if graphs else None)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
            ax.set_ylabel("images / s")
            ax.set_title(f"{net} {MODE_LABEL[mode]}, {prec}")
            ax.legend(fontsize=7)
        fig.suptitle(f"fusenet vs PyTorch on {device}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{net}_{prec}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    layers = [r for r in doc["layers"] if "error" not in r]
    if layers:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers)), 4.5))
        names = [f"{r['shape']}\n{r['op']}" for r in layers]
        xs = range(len(layers))
        ax.bar([x - 0.2 for x in xs], [r["fusenet"]["tflops"] for r in layers], 0.4, label="fusenet")
        ax.bar([x + 0.2 for x in xs], [r["cudnn"]["tflops"] for r in layers], 0.4, label="cuDNN / PyTorch")
        ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"per-layer convolution, {layers[0]['precision']}, {device}")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"layers_{layers[0]['precision']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

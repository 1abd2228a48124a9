"""The GPU verification run: one command on a GPU machine, everything in one folder.

    bash benchmarks/run_gpu.sh [--out DIR] [--quick] [--steps tests,tune,networks,layers]

Steps, each writing its files as soon as it ends (so a run cut short by a time
limit keeps what it finished, and a rerun with the same --out skips finished
work):
1. env.json      python, torch, triton, CUDA, driver, device, git commit;
2. tests         `pytest -m gpu`: every kernel test and every example network
                 in fp32, tf32, fp16 and bf16 on CUDA -> gpu_tests.txt/.xml;
3. tune          `fusenet tune` for each workload network (fills the autotune
                 cache before anything is timed) -> tune.txt;
4. networks      `fusenet bench` for each [[network]] of benchmarks/workloads.toml
                 -> networks/NAME_PRECISION.json (and its table and charts in
                 networks/NAME_PRECISION/);
5. layers        `fusenet bench --layers` for its [[layer]] shapes -> layers.json
                 (and layers/);
then results.json (everything merged), table.txt, charts (*.png) and
SUMMARY.md. The autotune cache is kept in the folder too (tune_cache.json)
unless FUSENET_TUNE_CACHE names another. Each step runs in a subprocess with a time limit, so one crash or
hang costs that step only. Commit the folder under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from engine.precision import PERFORMANCE_DEFAULT

ROOT = Path(__file__).resolve().parents[3]
WORKLOADS = ROOT / "benchmarks" / "workloads.toml"
STEPS = ("tests", "tune", "networks", "layers")


def _log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], log_path: Path, timeout: float) -> int:
    """Run cmd with output to log_path (and a tail on the console); its exit status, 124 on timeout."""
    _log("$ " + " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log_path, "a") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[suite] timed out after {timeout:.0f} s\n")
            rc = 124
    tail = log_path.read_text().splitlines()[-3:]
    _log(f"  exit {rc}; " + " | ".join(t.strip() for t in tail))
    return rc


def _fusenet(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def environment() -> dict:
    import torch

    from engine.perf.bench.devices import device_info

    env = device_info("cuda" if torch.cuda.is_available() else "cpu")
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    return env


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _test_counts(text: str) -> str:
    """pytest's final summary line ('12 passed, 3 skipped in 40.1s')."""
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary (see gpu_tests.txt)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run_gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results folder (default benchmarks/results/DATE-DEVICE)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {','.join(STEPS)}")
    p.add_argument("--workloads", default=str(WORKLOADS))
    p.add_argument("--quick", action="store_true",
                   help="first batch size only, no max-autotune: a fast first look")
    p.add_argument("--step-timeout", type=float, default=1800, help="seconds per subprocess (default 1800)")
    args = p.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if bad := [s for s in steps if s not in STEPS]:
        p.error(f"unknown step(s) {', '.join(bad)}; choose from {', '.join(STEPS)}")
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/run_gpu.sh: this is the GPU verification run and this machine has no CUDA device.\n"
              "hint: on a CPU machine run the test suite (make test) and `fusenet bench FILE` for the analytic "
              "model.", file=sys.stderr)
        return 1
    try:
        work = tomllib.loads(Path(args.workloads).read_text())
    except (OSError, ValueError) as e:
        print(f"benchmarks/run_gpu.sh: cannot read the workloads file {args.workloads}: {e}", file=sys.stderr)
        return 1
    env = environment()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-{_slug(env['name'])}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    # the tuned configs live with the results: they come back with the folder and
    # survive the machine (unless the caller chose a cache of their own)
    os.environ.setdefault("FUSENET_TUNE_CACHE", str((out / "tune_cache.json").resolve()))
    _log(f"device {env['name']}, torch {env['torch']}, triton {env['triton']}; writing to {out}")
    summary: dict = {"tests": None, "failed_steps": []}
    networks = work.get("network", [])

    if "tests" in steps:
        rc = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE",
                   "--continue-on-collection-errors", f"--junitxml={out / 'gpu_tests.xml'}",
                   "tests"],
                  out / "gpu_tests.txt", args.step_timeout)
        summary["tests"] = {"exit": rc, "summary": _test_counts((out / "gpu_tests.txt").read_text())}
        if rc != 0:
            summary["failed_steps"].append("tests")

    def batches(net: dict) -> str:
        b = [int(x) for x in net.get("batch", [])] or [256]
        return ",".join(map(str, b[:1] if args.quick else b))

    if "tune" in steps:
        for net in networks:
            rc = _run(_fusenet("tune", net["file"], "--batch", batches(net), "--precision", net.get("precision", PERFORMANCE_DEFAULT)),
                      out / "tune.txt", args.step_timeout)
            if rc != 0:
                summary["failed_steps"].append(f"tune {net['file']}")

        if work.get("layer"):
            rc = _run(_fusenet("tune", "--layers", args.workloads, "--precision", PERFORMANCE_DEFAULT), out / "tune.txt",
                      args.step_timeout)
            if rc != 0:
                summary["failed_steps"].append("tune --layers")

    contenders = "fusenet,eager,compile" if args.quick else "fusenet,eager,compile,compile-max"
    if "networks" in steps:
        (out / "networks").mkdir(exist_ok=True)
        for net in networks:
            prec = net.get("precision", PERFORMANCE_DEFAULT)
            target = out / "networks" / f"{Path(net['file']).stem}_{prec}.json"
            if target.exists():
                _log(f"{target.name} exists: skipped (delete it to rerun)")
                continue
            rc = _run(_fusenet("bench", net["file"], "--batch", batches(net), "--precision", prec,
                               "--contenders", contenders, "--json", str(target),
                               "--out", str(target.with_suffix(""))),
                      out / "bench_networks.txt", args.step_timeout)
            if rc != 0:
                summary["failed_steps"].append(f"bench {net['file']} (exit {rc})")

    if "layers" in steps and work.get("layer"):
        target = out / "layers.json"
        if target.exists():
            _log("layers.json exists: skipped (delete it to rerun)")
        else:
            rc = _run(_fusenet("bench", "--layers", args.workloads, "--precision", PERFORMANCE_DEFAULT, "--json", str(target),
                               "--out", str(out / "layers")),
                      out / "bench_layers.txt", args.step_timeout)
            if rc != 0:
                summary["failed_steps"].append(f"bench --layers (exit {rc})")

    merged = merge(out, env)
    _write_summary(out, merged, summary)
    _log(f"done: {out}/SUMMARY.md")
    return 1 if summary["failed_steps"] else 0


def merge(out: Path, env: dict) -> dict:
    """All results of a run folder in one document, with its table and charts."""
    from engine.perf.bench import results

    doc = results.new_document(env, ["benchmarks/run_gpu.sh"])
    parts = sorted((out / "networks").glob("*.json")) if (out / "networks").is_dir() else []
    if (out / "layers.json").exists():
        parts.append(out / "layers.json")
    for part in parts:
        try:
            d = results.load(part)
        except ValueError as e:
            _log(f"skipping {part}: {e}")
            continue
        doc["networks"] += d["networks"]
        doc["layers"] += d["layers"]
    results.save(doc, out / "results.json")
    (out / "table.txt").write_text(results.format_document(doc) + "\n")
    try:
        results.plot(doc, out)
    except ImportError as e:  # matplotlib missing on the GPU machine: tables and JSON still stand
        _log(f"no charts: {e}")
    return doc


def _write_summary(out: Path, doc: dict, summary: dict) -> None:
    env = doc["device"]
    lines = [f"# fusenet GPU verification run: {env.get('name')}", "",
             f"- device: {env.get('name')} (sm {env.get('capability')}, {env.get('sms')} SMs, "
             f"{env.get('memory_gib')} GiB), driver/clocks: {env.get('nvidia_smi')}",
             f"- software: torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}, python {env.get('python')}",
             f"- fusenet commit: {env.get('git_commit')}", ""]
    if summary["tests"]:
        lines += [f"GPU test tier (`pytest -m gpu`): {summary['tests']['summary']} "
                  f"(exit {summary['tests']['exit']}; gpu_tests.txt)", ""]
    if summary["failed_steps"]:
        lines += ["Steps that failed (see their .txt logs): " + "; ".join(summary["failed_steps"]), ""]
    lines += ["```", (out / "table.txt").read_text().rstrip(), "```", ""]
    lines += [f"![{p.stem}]({p.name})" for p in sorted(out.glob("*.png"))]
    (out / "SUMMARY.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""`fusenet tune FILE`: fill the autotune cache for a network (`--layers`: for the
per-layer benchmark's convolutions); `fusenet tune --show` lists it.

Tuning times every candidate tile config of each conv and linear kernel of a
training step and of an inference forward, at each batch size asked for, and
stores the fastest in the cache (engine.kernels.autotune) that later runs on
the same GPU read without timing anything. Timings need a CUDA GPU: without
one this says so and exits 1 (the interpreter never tunes: its timings would
measure the interpreter, not the kernels).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from engine import resources
from engine.cli.common import LAYERS_PRECISION, input_path, layer_shapes, parse_batches
from engine.errors import UsageError
from engine.precision import NAMES as PRECISIONS
from engine.text import format_table


def _short(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def format_entries(entries: dict) -> str:
    """The cache entries as a table: kernel, shape key, dtype, device, config, time, time of the heuristic."""
    rows = []
    for key in sorted(entries, key=lambda k: (entries[k].get("device", ""), entries[k].get("kernel", ""), k)):
        e = entries[key]
        config = str(_config(e))
        ms = f"{e['ms']:.4f}" if isinstance(e.get("ms"), (int, float)) else "-"
        dms = f"{e['default_ms']:.4f}" if isinstance(e.get("default_ms"), (int, float)) else "-"
        shape = _short(e["shape"]) if isinstance(e.get("shape"), dict) else key.split("|")[1]
        rows.append((str(e.get("kernel", key.split("|")[0])), shape, str(e.get("dtype", "?")),
                     str(e.get("device", "?")), config, ms, dms))
    return format_table(("kernel", "shape", "dtype", "device", "config", "ms", "default ms"), rows, align="lllllr")


def _config(entry: dict):
    from engine.kernels.tune_config import Config

    return Config.from_json(entry["config"])


def cmd_show(path: Path) -> int:
    from engine.kernels.tune_cache import TuneCache

    entries = TuneCache(path).entries  # read afresh
    if not entries:
        print(f"autotune cache {path}: no entries (fill it with `fusenet tune FILE` on a CUDA GPU)")
        return 0
    print(f"autotune cache {path}: {len(entries)} entries")
    print(format_entries(entries))
    return 0


def cmd_tune(args) -> int:
    import engine
    from engine.device import HAS_CUDA
    from engine.kernels import autotune, tune_cache

    path = tune_cache.cache_path()
    if args.show:
        return cmd_show(path)
    if not args.file:
        if not args.layers:
            raise UsageError("give the network FILE to tune (or --show to list the cache)")
        args.file = str(resources.WORKLOADS)
    args.file = input_path(args.file)
    batches = parse_batches(args.batch, example="64,256") if args.batch else None
    layers = args.layers or Path(args.file).suffix == ".toml"
    spec = None if Path(args.file).suffix == ".toml" else engine.load(Path(args.file))  # reported first, GPU or not
    if not HAS_CUDA:
        n = len(tune_cache.TuneCache(path).entries)
        print("fusenet tune: tuning times the kernels on a CUDA GPU and this machine has none (the interpreter\n"
              "always runs its one interpreter tile config, so there is nothing to tune here).\n"
              f"autotune cache: {path} ({n} {'entry' if n == 1 else 'entries'}; `fusenet tune --show` lists them)",
              file=sys.stderr)
        return 1
    import torch

    from engine.perf.step import network_step

    if layers:
        return _tune_layers(args, batches)
    precision = args.precision or spec.train.precision
    batches = batches or [spec.train.batch]
    model = engine.compile(Path(args.file), precision=precision).cuda()
    started = time.perf_counter()
    with autotune.tuning() as stats:
        for batch in batches:
            t0, tuned_before = time.perf_counter(), len(stats.tuned)
            # one training step (forward, loss, backward, optimizer) and one inference forward,
            # with inputs made on the GPU
            with torch.device("cuda"):
                network_step(model, batch, training=True)()
                network_step(model, batch, training=False)()
            torch.cuda.synchronize()
            print(f"batch {batch}: {len(stats.tuned) - tuned_before} kernel configs tuned "
                  f"in {time.perf_counter() - t0:.1f} s")
    elapsed = time.perf_counter() - started
    skipped = f"; {stats.skipped} candidate configs skipped (did not compile or launch)" if stats.skipped else ""
    print(f"{model.name} ({precision}, batch {','.join(map(str, batches))}): {len(stats.tuned)} kernel configs "
          f"tuned, {len(stats.cached - set(stats.tuned))} already cached{skipped}")
    print(f"autotune cache: {path} ({len(tune_cache.cache_entries())} entries)")
    print(f"elapsed {elapsed:.1f} s")
    return 0


def _tune_layers(args, batches) -> int:
    """Tune the conv kernels of `fusenet bench --layers` (forward, dgrad, wgrad, fused group) per shape."""
    import torch

    from engine.kernels import autotune, tune_cache
    from engine.perf.bench.layers import layer_cases

    precision = args.precision or LAYERS_PRECISION
    shapes = layer_shapes(args.file, batches)
    gen = torch.Generator(device="cpu").manual_seed(0)
    started = time.perf_counter()
    with autotune.tuning() as stats:
        for shape in shapes:
            t0, before = time.perf_counter(), len(stats.tuned)
            for _, _, ours, _ in layer_cases(shape, precision, torch.device("cuda"), gen):
                ours()
            torch.cuda.synchronize()
            print(f"{shape.describe()}: {len(stats.tuned) - before} kernel configs tuned in "
                  f"{time.perf_counter() - t0:.1f} s")
    print(f"{len(shapes)} layer shapes ({precision}): {len(stats.tuned)} kernel configs tuned, "
          f"{len(stats.cached - set(stats.tuned))} already cached")
    print(f"autotune cache: {tune_cache.cache_path()} ({len(tune_cache.cache_entries())} entries)")
    print(f"elapsed {time.perf_counter() - started:.1f} s")
    return 0


def add_commands(sub) -> None:
    """Register tune on an argparse subparsers object."""
    p = sub.add_parser("tune", help="time the conv/linear kernels' tile configs on the GPU and cache the fastest")
    p.add_argument("file", nargs="?", help="the network spec (not needed with --show; with --layers, default: "
                                          "the shipped benchmarks/workloads.toml)")
    p.add_argument("--batch", help="batch sizes, e.g. 64,256 (default: the spec's)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the spec's")
    p.add_argument("--layers", action="store_true",
                   help="tune the convolutions of `fusenet bench --layers FILE` (a spec or a workloads .toml)")
    p.add_argument("--show", action="store_true", help="list the cache's entries and exit")
    p.set_defaults(func=cmd_tune)

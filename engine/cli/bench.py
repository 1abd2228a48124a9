"""`fusenet bench FILE`: fusenet against the PyTorch baselines.

On a CUDA device: a network spec is timed against PyTorch eager (cuDNN),
torch.compile and torch.compile max-autotune, with and without CUDA graphs, for
the forward pass and the whole training step (engine.perf.bench.network); with
--layers, each convolution against cuDNN (engine.perf.bench.layers). Results come
out as a terminal table, JSON and PNG charts (engine.perf.bench.results).

Without a CUDA device it says plainly that timings need one and prints the
analytic model instead (engine.perf.analytic), then the static sm_90 report
of `fusenet inspect` (unless --no-inspect): interpreter timings would time the
interpreter, not the kernels, so none are taken.

A results file (.json) given as FILE is re-rendered (tables, charts) without
running anything; so is the analytic model's JSON that `--json` writes without
a GPU (a document of kind ANALYTIC_KIND).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine import resources
from engine.cli.common import LAYERS_PRECISION, input_path, layer_shapes, parse_batches
from engine.errors import InputFileError, UsageError
from engine.perf.bench.roster import CONTENDERS
from engine.precision import NAMES as PRECISIONS


ANALYTIC_KIND = "fusenet-analytic"


def _analytic_document(what: str, precision: str, body) -> dict:
    return {"kind": ANALYTIC_KIND, "version": 1, "what": what, "precision": precision, "reports": body}


def _write_json(path: str, doc) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2))
    except OSError as e:
        raise InputFileError(f"cannot write '{path}': {e.strerror or e}") from None


def _render_analytic(doc: dict) -> int:
    """Print an analytic-model JSON written by `bench --json` without a GPU."""
    if doc.get("what") == "layers":
        from engine.perf.bench.layers import format_analytic_layers

        print(format_analytic_layers(doc["reports"], doc["precision"]))
        return 0
    from engine.perf.analytic import format_analytic

    for report in doc["reports"]:
        print(format_analytic(report))
        print()
    return 0


def _emit(doc: dict, args) -> int:
    """Print the tables; write JSON and charts where asked; 1 if a check failed."""
    from engine.perf.bench import results

    print(results.format_document(doc))
    if args.out:
        out = Path(args.out)
        results.save(doc, out / "results.json")
        (out / "table.txt").write_text(results.format_document(doc) + "\n")
        charts = results.plot(doc, out)
        print(f"\nresults written to {out}/: results.json, table.txt, " + ", ".join(p.name for p in charts))
    if args.json:
        results.save(doc, args.json)
        print(f"results written to {args.json}")
    bad = results.failed_checks(doc)
    if bad:
        print(f"fusenet bench: {len(bad)} result(s) disagree with fusenet's output beyond tolerance; a fast "
              "wrong answer is not a win (see the 'check' column)", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from engine.device import HAS_CUDA

    if args.file is None:
        if not args.layers:
            raise UsageError("give the FILE to benchmark (a spec, a workloads .toml or a results .json); "
                             "`--layers` alone runs the shipped benchmarks/workloads.toml")
        args.file = str(resources.WORKLOADS)
    args.file = input_path(args.file)
    if Path(args.file).suffix == ".json":
        from engine.perf.bench import results

        try:
            raw = json.loads(Path(args.file).read_text())
        except (OSError, ValueError):
            raw = None
        if isinstance(raw, dict) and raw.get("kind") == ANALYTIC_KIND and isinstance(raw.get("reports"), list):
            return _render_analytic(raw)
        try:
            doc = results.load(args.file)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return _emit(doc, args)
    batches = parse_batches(args.batch) if args.batch else None
    contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown or "fusenet" not in contenders:
        raise UsageError(f"--contenders takes a comma list of {', '.join(CONTENDERS)} including fusenet, "
                         f"got {args.contenders!r}")
    if Path(args.file).suffix == ".toml" and not args.layers:
        raise UsageError("a .toml workloads file holds layer shapes: use `fusenet bench --layers FILE.toml`")
    if not HAS_CUDA:
        return _without_gpu(args, batches)
    return _with_gpu(args, batches, contenders)


def _default_out(name: str) -> Path:
    """runs/bench/NAME, or NAME-2, -3, ... : a folder that holds no results yet."""
    base = Path("runs") / "bench" / name
    return next(p for p in [base, *(Path(f"{base}-{i}") for i in range(2, 10000))]
                if not (p / "results.json").exists())


def _with_gpu(args, batches, contenders, device: str = "cuda") -> int:
    """Time on `device` (tests pass "cpu" to exercise the harness without a GPU).
    Results always land in a folder (--out, else runs/bench/NAME): JSON, table, charts."""
    from engine.perf.bench import results
    from engine.perf.bench.devices import device_info

    doc = results.new_document(device_info(device), ["fusenet", "bench", *sys.argv[2:]])
    timing = dict(warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds, device=device)
    if args.layers:
        from engine.perf.bench.layers import bench_layers

        precision = args.precision or LAYERS_PRECISION
        shapes = layer_shapes(args.file, batches)
        print(f"fusenet bench --layers: {len(shapes)} convolution shape(s), {precision}", file=sys.stderr)
        doc["layers"] = bench_layers(shapes, precision, **timing)
        name = "layers-" + Path(args.file).stem
    else:
        import engine
        from engine.perf.bench.network import bench_network

        spec = engine.load(Path(args.file))
        precision = args.precision or spec.train.precision
        graphs = (False,) if args.no_graphs else (False, True)
        print(f"fusenet bench: {spec.graph.name}, batch {','.join(map(str, batches or [spec.train.batch]))}, "
              f"{precision}, against {', '.join(contenders[1:]) or 'nothing'}", file=sys.stderr)
        if device == "cuda":
            print(_tuning_note(), file=sys.stderr)
        doc["networks"] = bench_network(Path(args.file), batches or [spec.train.batch], precision,
                                        contenders=contenders, graphs=graphs, **timing)
        name = spec.graph.name
    if not args.out:
        args.out = str(_default_out(name))
    return _emit(doc, args)


def _tuning_note() -> str:
    """How many tuned kernel configs this device has: untuned tiles are the heuristics'."""
    import torch

    from engine.kernels import autotune, tune_cache

    here = autotune.device_key(torch.device("cuda"))
    n = sum(1 for e in tune_cache.cache_entries().values() if e.get("device") == here)
    if n:
        return f"autotune cache: {n} tuned kernel configs for {here} ({tune_cache.cache_path()})"
    return (f"autotune cache: nothing tuned for {here} yet; fusenet runs its heuristic tiles "
            "(run `fusenet tune FILE --batch ...` first for tuned ones)")


def _without_gpu(args, batches) -> int:
    print("fusenet bench: timings need a CUDA GPU and this machine has none (interpreted kernels would time\n"
          "the interpreter, not the kernels). The analytic model follows: FLOPs and minimum HBM bytes per\n"
          "kernel and per training step, fused against unfused, with roofline floors on an H100.",
          file=sys.stderr)
    if args.layers:
        from engine.perf.bench.layers import analytic_layers, format_analytic_layers

        precision = args.precision or LAYERS_PRECISION
        rows = analytic_layers(layer_shapes(args.file, batches), precision)
        print(format_analytic_layers(rows, precision))
        if args.json:
            _write_json(args.json, _analytic_document("layers", precision, rows))
            print(f"analytic model written to {args.json} (`fusenet bench {args.json}` prints it again)")
        return 0
    import engine
    from engine.perf.analytic import analytic_report, format_analytic
    from engine.perf.audit import audit_step, format_audit

    spec = engine.load(Path(args.file))
    precision = args.precision or spec.train.precision
    batches = batches or [spec.train.batch]
    reports = []
    for batch in batches:
        report = analytic_report(spec, batch, precision)
        reports.append(report)
        print(format_analytic(report))
        print()
        print(format_audit(audit_step(spec, batch, precision), f"step audit ({spec.graph.name}, batch {batch}, "
                           f"{precision}): one training step, dry-run on the meta device"))
        print()
    if args.json:
        _write_json(args.json, _analytic_document("network", precision, reports))
        print(f"analytic model written to {args.json} (`fusenet bench {args.json}` prints it again)")
    if not args.no_inspect:
        from engine.perf.aot import compile_all, format_report, record_network
        from engine.perf.step import network_step

        model = engine.compile(Path(args.file), precision=precision)
        variants = record_network(network_step(model, batches[0], True))
        print(f"fusenet bench: compiling {len(variants)} kernel variants for sm_90 for the static report "
              "(cached after the first run; --no-inspect skips it)", file=sys.stderr)
        static = compile_all(variants, ("sm_90",))
        print(f"static sm_90 report (training step, batch {batches[0]}, {precision}): registers, spills, "
              "shared memory, tensor-core instructions, from the SASS")
        print(format_report(static))
    return 0


def add_commands(sub) -> None:
    """Register bench on an argparse subparsers object."""
    p = sub.add_parser("bench", help="fusenet against PyTorch eager and torch.compile (analytic model without a GPU)",
                       description="FILE: a network spec (.cnn); with --layers a spec or a workloads file "
                                   "(.toml, e.g. benchmarks/workloads.toml); or a results file (.json) to "
                                   "re-render its tables and charts.")
    p.add_argument("file", nargs="?", help="with --layers, default: the shipped benchmarks/workloads.toml")
    p.add_argument("--batch", help="batch sizes, e.g. 64,256,1024 (default: the spec's; --layers: the file's)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"default: the spec's (--layers: {LAYERS_PRECISION})")
    p.add_argument("--layers", action="store_true",
                   help="per convolution: forward, dgrad, wgrad against cuDNN, fused groups against unfused")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma list (default: all of {','.join(CONTENDERS)})")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA graphs variants")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default 5)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls; the median is reported (default 50)")
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="cap on one measurement's timed phase; fewer repeats if slower (default 10)")
    p.add_argument("--out", help="folder for results.json, table.txt and the PNG charts (default runs/bench/NAME)")
    p.add_argument("--json", help="also write the results (or, without a GPU, the analytic model) as JSON here")
    p.add_argument("--no-inspect", action="store_true",
                   help="without a GPU: skip the static sm_90 report (it compiles every kernel variant)")
    p.set_defaults(func=cmd_bench)

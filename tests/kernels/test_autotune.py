"""engine/kernels/autotune.py and tune_cache.py: the on-disk cache, selection
with a fake timer, the modes of pick(), and forced non-default tile configs
computing the same results as torch in every hooked launcher (interpreted).
Candidates and configs alone: test_tune_config.py.

Every test works on a cache file under tmp_path (autouse fixture): the real
~/.cache is never touched.
"""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_torch

import engine.device
import engine.kernels.conv.wgrad as conv_wgrad
import engine.kernels.tune_cache as cache_file
from engine.kernels import autotune
from engine.kernels.tune_cache import TuneCache
from engine.kernels.tune_config import Config
from engine.kernels.conv import conv2d, conv2d_dgrad, conv2d_forward, conv2d_wgrad
from engine.kernels.launch import recording
from engine.kernels.linear import linear, linear_dgrad, linear_forward, linear_wgrad

DEVICE = "FakeGPU 80GB (sm_90)"


@pytest.fixture(autouse=True)
def tune_cache(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("FUSENET_TUNE_CACHE", str(path))
    monkeypatch.delenv("FUSENET_TUNE", raising=False)
    return path


class FakeTimer:
    """Times a run by the config it launched last: `times[cfg]` ms (default 1.0), counting calls."""

    def __init__(self, times=None, fail=()):
        self.times, self.fail = dict(times or {}), set(fail)
        self.launched: list[Config] = []
        self.timed: list[Config] = []

    def run(self, cfg: Config):
        self.launched.append(cfg)
        if cfg in self.fail:
            raise RuntimeError(f"out of resources: {cfg}")  # like triton's OutOfResources

    def __call__(self, fn):
        fn()
        self.timed.append(self.launched[-1])
        return self.times.get(self.launched[-1], 1.0)


def _select(timer, shape=None, dtype=torch.float32, device=DEVICE, tune=True, candidates=None, default=None):
    default = default or Config(64, 64, 32, num_warps=4, num_stages=3)
    return autotune.select("conv2d_fwd", shape or dict(M=4096, N=64, K=576), dtype=dtype, device_name=device,
                           default=default, candidates=lambda: candidates or [], run=timer.run, tune=tune,
                           timer=timer)


# --------------------------------------------------------------------------- #
# Cache file
# --------------------------------------------------------------------------- #
def test_round_trip_and_keying(tune_cache):
    best = Config(128, 128, 64, num_warps=8, num_stages=3)
    timer = FakeTimer({best: 0.5})
    assert _select(timer, candidates=[best]) == best
    data = json.loads(tune_cache.read_text())
    assert data["schema"] == cache_file.SCHEMA
    (key, entry), = data["entries"].items()
    assert key.startswith("conv2d_fwd|M=4096,N=64,K=576|float32|FakeGPU 80GB (sm_90)|triton-")
    assert entry["config"] == best.to_json() and entry["ms"] == 0.5 and entry["default_ms"] == 1.0
    assert Config.from_json(entry["config"]) == best
    # a fresh reader (another process) gets it back
    assert TuneCache(tune_cache).get(key) == best
    # another dtype, device or shape is another entry
    for kw in (dict(dtype=torch.bfloat16), dict(device="Other GPU (sm_80)"), dict(shape=dict(M=1024, N=64, K=576))):
        _select(FakeTimer({best: 0.5}), candidates=[best], **kw)
    assert len(json.loads(tune_cache.read_text())["entries"]) == 4


def test_write_merges_with_entries_written_meanwhile(tune_cache):
    ours, theirs = TuneCache(tune_cache), TuneCache(tune_cache)
    assert ours.entries == {}  # loaded before the other process writes
    theirs.put("theirs", {"config": Config(64, 32, 32).to_json(), "ms": 1.0})
    ours.put("ours", {"config": Config(128, 64, 32).to_json(), "ms": 2.0})
    on_disk = json.loads(tune_cache.read_text())["entries"]
    assert set(on_disk) == {"theirs", "ours"}
    assert set(ours.entries) == {"theirs", "ours"}  # the merge refreshed what this process sees
    assert [p.name for p in tune_cache.parent.iterdir() if p.suffix == ".tmp"] == []


def test_concurrent_writers_keep_every_entry(tune_cache):
    def writer(k):
        cache = TuneCache(tune_cache)  # its own file handle and view, like a separate process
        for i in range(10):
            cache.put(f"w{k}-{i}", {"config": Config(64, 64, 32).to_json(), "ms": float(i)})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(tune_cache.read_text())["entries"]) == 40


def test_failed_write_keeps_the_old_file(tune_cache, monkeypatch, capsys):
    cache = TuneCache(tune_cache)
    cache.put("old", {"config": Config(64, 64, 32).to_json()})
    before = tune_cache.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache_file.os, "replace", broken_replace)
    cache.put("new", {"config": Config(64, 64, 32).to_json()})
    cache.put("newer", {"config": Config(64, 64, 32).to_json()})
    assert tune_cache.read_text() == before  # never half-written
    assert [p.name for p in tune_cache.parent.iterdir() if p.suffix == ".tmp"] == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "disk full" in err[0]
    assert cache.get("newer") == Config(64, 64, 32)  # still used in this process


@pytest.mark.parametrize("content,what", [
    ("{not json", "not valid JSON"),
    ('{"schema": 99, "entries": {}}', "schema"),
    ('[1, 2]', "schema"),
    (b"\xff\xfe\x00garbage", "unreadable"),
])
def test_corrupt_cache_warns_once_and_is_rebuilt(tune_cache, capsys, content, what):
    if isinstance(content, bytes):
        tune_cache.write_bytes(content)
    else:
        tune_cache.write_text(content)
    default = Config(64, 64, 32, num_warps=4, num_stages=3)
    timer = FakeTimer()
    assert _select(timer, tune=False, default=default) == default  # a miss, no crash
    assert _select(timer, tune=False, default=default, shape=dict(M=1)) == default
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(tune_cache) in err[0] and what in err[0] and "delete" in err[0]
    # tuning rewrites it as a valid cache
    best = Config(128, 64, 32, num_warps=4, num_stages=4)
    assert _select(FakeTimer({best: 0.1}), candidates=[best]) == best
    assert len(json.loads(tune_cache.read_text())["entries"]) == 1
    assert capsys.readouterr().err == ""


def test_malformed_entries_are_dropped_not_the_file(tune_cache, capsys):
    good = {"config": Config(64, 64, 32).to_json(), "ms": 1.0}
    tune_cache.write_text(json.dumps({"schema": cache_file.SCHEMA, "entries": {
        "good": good, "bad1": {"config": {"block_m": "big"}}, "bad2": 7}}))
    cache = TuneCache(tune_cache)
    assert set(cache.entries) == {"good"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 malformed entries" in err[0]


# --------------------------------------------------------------------------- #
# Selection and modes
# --------------------------------------------------------------------------- #
def test_select_picks_fastest_skips_failures_then_hits_the_cache(tune_cache):
    default = Config(64, 64, 32, num_warps=4, num_stages=3)
    fast, broken, slow = (Config(128, 128, 32, num_warps=8, num_stages=4), Config(128, 256, 64, num_warps=8,
                          num_stages=2), Config(64, 32, 32, num_warps=4, num_stages=4))
    timer = FakeTimer({default: 1.0, fast: 0.25, broken: 0.01, slow: 3.0}, fail=[broken])
    with autotune.tuning() as stats:
        assert _select(timer, default=default, candidates=[fast, broken, slow, default]) == fast
    assert set(timer.timed) == {default, fast, slow}  # default timed once, the failure never
    assert broken in timer.launched and broken not in timer.timed
    assert stats.skipped == 1 and len(stats.tuned) == 1 and not stats.cached
    entry = json.loads(tune_cache.read_text())["entries"][stats.tuned[0]]
    assert entry["config"] == fast.to_json() and entry["candidates"] == 4 and entry["failed"] == 1
    # second call: from the cache, nothing launched or timed
    timer2 = FakeTimer()
    with autotune.tuning() as stats2:
        assert _select(timer2, default=default, candidates=[slow]) == fast
    assert timer2.launched == [] and timer2.timed == []
    assert stats2.cached == set(stats.tuned) and not stats2.tuned


def test_select_without_tuning_returns_default_and_stores_nothing(tune_cache):
    default = Config(64, 64, 32)
    timer = FakeTimer()
    assert _select(timer, tune=False, default=default, candidates=[Config(128, 64, 32)]) == default
    assert timer.launched == [] and not tune_cache.exists()


def test_all_candidates_failing_falls_back_to_default(tune_cache):
    default = Config(64, 64, 32)
    other = Config(128, 64, 32)
    timer = FakeTimer(fail=[default, other])
    assert _select(timer, default=default, candidates=[other]) == default
    assert not tune_cache.exists()


@pytest.fixture
def fake_cuda(monkeypatch):
    """pick() as on a GPU: not interpreted, a fake device name, a fake timer."""
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(autotune, "device_key", lambda device: DEVICE)
    timer = FakeTimer()
    monkeypatch.setattr(autotune, "cuda_event_timer", timer)
    return timer


def _pick(timer, default, candidates, device="cuda", **kw):
    return autotune.pick("linear_fwd", dict(M=256, N=64, K=128), dtype=torch.float16, device=torch.device(device),
                         default=default, candidates=lambda: candidates, run=timer.run, **kw)


def test_pick_modes(fake_cuda, monkeypatch, tune_cache):
    default, fast = Config(64, 64, 32, num_warps=8), Config(128, 64, 32, num_warps=4, num_stages=4)
    fake_cuda.times = {default: 1.0, fast: 0.5}
    assert _pick(fake_cuda, default, [fast]) == default  # default mode: a miss is the heuristic
    with recording():
        with autotune.tuning():
            assert _pick(fake_cuda, default, [fast]) == default  # recording: never timed
        with autotune.tuning():
            assert _pick(fake_cuda, default, [fast], tunable=False) == default
    assert fake_cuda.launched == [] and not tune_cache.exists()
    monkeypatch.setenv("FUSENET_TUNE", "1")
    assert autotune.is_tuning()
    assert _pick(fake_cuda, default, [fast]) == fast
    monkeypatch.delenv("FUSENET_TUNE")
    fake_cuda.launched.clear()
    assert _pick(fake_cuda, default, [fast]) == fast  # cached: used in default mode
    with recording():
        assert _pick(fake_cuda, default, [fast]) == fast  # what runs is what is recorded
    assert fake_cuda.launched == []
    assert _pick(fake_cuda, default, [fast], device="cpu") == default  # off CUDA: the heuristic
    with autotune.forced(Config(16, 16, 16)):
        assert _pick(fake_cuda, default, [fast]) == Config(16, 16, 16)
    with autotune.forced(Config(16, 16, 16), kernels=["conv2d_fwd"]):
        assert _pick(fake_cuda, default, [fast]) == fast


def test_interpreter_never_tunes_nor_reads_the_cache(tune_cache):
    assert engine.device.INTERPRETED
    tune_cache.write_text("{corrupt")  # would warn if it were read
    default = Config(64, 64, 32)
    timer = FakeTimer()
    with autotune.tuning() as stats:
        assert _pick(timer, default, [Config(128, 64, 32)]) == default
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        assert_close(linear(x, w, b), F.linear(x.double(), w.double(), b.double()))
    assert timer.launched == [] and not stats.tuned and not stats.cached
    assert tune_cache.read_text() == "{corrupt"
    assert tune_cache not in cache_file._caches


def test_gpu_tiles_on_cpu_tensors_skip_the_cache(monkeypatch, tune_cache):
    # the AOT check's setting: GPU tile heuristics, CPU tensors: no cache, no device query
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    monkeypatch.setattr(autotune, "device_key", lambda device: pytest.fail("device queried"))
    with autotune.tuning():
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        assert_close(linear(x, w, b), F.linear(x.double(), w.double(), b.double()))
    assert not tune_cache.exists()


# --------------------------------------------------------------------------- #
# Forced non-default configs compute what torch computes (interpreted)
# --------------------------------------------------------------------------- #
def nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def nchw(t):
    return t.permute(0, 3, 1, 2)


def _used(specs, kernel):
    return [dict(s.constexprs) | {"num_warps": s.num_warps, "num_stages": s.num_stages}
            for s in specs if s.name == kernel]


CONV_CASES = {  # (N, Cin, H, W, Cout, k, kwargs)
    "3x3_s2_cout10": (2, 5, 9, 7, 10, 3, dict(stride=2, padding=1)),
    "groups2_5x5": (1, 6, 8, 7, 14, 5, dict(padding=2, groups=2)),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_forced_config_conv_forward_backward(name):
    N, Cin, H, W, Cout, k, kw = CONV_CASES[name]
    groups = kw.get("groups", 1)
    x = torch.randn(N, Cin, H, W, requires_grad=True)
    wt = (torch.randn(Cout, Cin // groups, k, k) / (Cin // groups * k * k) ** 0.5).requires_grad_()
    b = torch.randn(Cout, requires_grad=True)
    forced = Config(32, 16, 16, num_warps=4, num_stages=2, split=3)

    def ours(x, w, b):
        return nchw(conv2d(nhwc(x), w, b, act="relu", **kw))

    def ref(x, w, b):
        return F.relu(F.conv2d(x, w, b, **kw))

    with autotune.forced(forced), recording() as specs:
        check_against_torch(ours, ref, [x, wt, b])
    fwd, dgrad, wgrad = (_used(specs, k) for k in ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"))
    assert fwd and dgrad and wgrad
    for c in fwd + dgrad:
        assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]) == (32, 16, 16, 4, 2)
    # wgrad's GEMM view: block_m -> BLOCK_K (weight rows), block_n -> BLOCK_N, block_k -> BLOCK_P
    assert all((c["BLOCK_K"], c["BLOCK_N"], c["BLOCK_P"]) == (32, 16, 16) for c in wgrad)


def test_forced_wgrad_split_and_stats_buffers(monkeypatch):
    x = torch.randn(3, 7, 11, 6)  # NHWC; P = 3*7*11 = 231 output pixels in 8 chunks of 32
    dy = torch.randn(3, 7, 11, 13)
    kw = dict(stride=1, padding=1, dilation=1, groups=1)
    ref_w = torch.nn.grad.conv2d_weight(nchw(x).double(), (13, 6, 3, 3), nchw(dy).double(), padding=1)
    splits_seen = []
    sum_partials, sum_to_torch = conv_wgrad.sum_partials, conv_wgrad._sum_to_torch

    def spy_bias(part, **kw):
        splits_seen.append(("db", part.shape[0]))
        return sum_partials(part, **kw)

    def spy_weight(part, *args):
        splits_seen.append(("dw", part.shape[0]))
        return sum_to_torch(part, *args)

    monkeypatch.setattr(conv_wgrad, "sum_partials", spy_bias)
    monkeypatch.setattr(conv_wgrad, "_sum_to_torch", spy_weight)
    monkeypatch.setattr(conv_wgrad, "WGRAD_TAIL_BYTES", 0)  # the second-launch fold, not the kernel's tail
    for split in (1, 3, 8):
        with autotune.forced(Config(64, 16, 32, split=split)):
            dw, db = conv2d_wgrad(x, dy, (13, 6, 3, 3), need_bias=True, **kw)
        assert_close(dw, ref_w, what=f"dw split {split}")
        assert_close(db, dy.double().sum((0, 1, 2)), what=f"db split {split}")
    # one split writes dw and db itself; S splits leave S partial rows each, folded in a fixed order
    assert splits_seen == [("dw", 3), ("db", 3), ("dw", 8), ("db", 8)]
    # dgrad alone, stride 3 (several phases), a forced config
    w = torch.randn(8, 5, 3, 3)
    dy3 = torch.randn(2, 4, 4, 8)
    with autotune.forced(Config(16, 16, 32, num_warps=8, num_stages=3)):
        dx = conv2d_dgrad(dy3, w, (2, 11, 10, 5), stride=3, padding=1, dilation=1, groups=1)
    ref = torch.nn.grad.conv2d_input((2, 5, 11, 10), w.double(), nchw(dy3).double(), stride=3, padding=1)
    assert_close(nchw(dx), ref, what="dx")
    # stats partials: one row per BLOCK_M tile of the forced config
    xs, ws = torch.randn(2, 9, 7, 5), torch.randn(10, 5, 3, 3)
    with autotune.forced(Config(32, 16, 16)):
        o = conv2d_forward(xs, ws, padding=1, stats=True, save_pre=True, act="relu")
    assert o.psum.shape == (4, 10)  # M = 126 pixels in 32-row tiles
    z = F.conv2d(nchw(xs).double(), ws.double(), padding=1)
    assert_close(o.psum.sum(0), z.sum((0, 2, 3)), what="psum")
    assert_close(o.psumsq.sum(0), (z * z).sum((0, 2, 3)), what="psumsq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forced_config_linear_forward_backward(dtype):
    n, f, o = 77, 37, 19
    x = torch.randn(n, f).to(dtype).requires_grad_()
    w = (torch.randn(o, f) / f**0.5).to(dtype).float().requires_grad_()
    b = torch.randn(o).requires_grad_()
    forced = Config(32, 16, 16, num_warps=4, num_stages=2, split=3)
    with autotune.forced(forced), recording() as specs:
        check_against_torch(lambda x, w, b: linear(x, w, b, act="gelu"), lambda x, w, b: F.gelu(F.linear(x, w, b)),
                            [x, w, b])
    for kernel in ("_linear_fwd_kernel", "_linear_dgrad_kernel", "_linear_wgrad_kernel"):
        used = _used(specs, kernel)
        assert used and all((c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"]) == (32, 16, 16, 4)
                            for c in used), kernel
    wgrad = _used(specs, "_linear_wgrad_kernel")
    assert all(c["TAIL"] for c in wgrad)  # 3 splits were summed, by the last of them to finish


def test_forced_linear_backward_launchers_alone():
    dy, w, x = torch.randn(45, 21), torch.randn(21, 33), torch.randn(45, 33)
    with autotune.forced(Config(16, 32, 16, split=2)):
        dx = linear_dgrad(dy, w)
        dw, db = linear_wgrad(dy, x, has_bias=True)
    assert_close(dx, dy.double() @ w.double(), what="dx")
    assert_close(dw, dy.double().t() @ x.double(), what="dw")
    assert_close(db, dy.double().sum(0), what="db")


def test_every_candidate_config_is_correct(monkeypatch):
    # design notes, section 3: check every config for correctness, not just the winner.
    # GPU heuristics (so wgrad also gets its split-count variants), run interpreted.
    monkeypatch.setattr(engine.device, "INTERPRETED", False)
    offered: dict[str, list[Config]] = {}

    def offer_and_keep_default(kernel, shape, *, default, candidates, **_):
        offered[kernel] = list(candidates())
        return default

    x, w, b = torch.randn(2, 9, 9, 8), torch.randn(40, 8, 3, 3) / 8, torch.randn(40)  # NHWC x, M = 162
    dy = torch.randn(2, 9, 9, 40)
    # wgrad reduces over pixels: enough of them (P = 1152) for several chunks, so split counts are offered
    xw, dyw = torch.randn(2, 24, 24, 8), torch.randn(2, 24, 24, 40)
    geo = dict(stride=1, padding=1, dilation=1, groups=1)
    xl, wl, dyl = torch.randn(150, 70), torch.randn(40, 70), torch.randn(150, 40)
    launchers = {
        "conv2d_fwd": (lambda: conv2d_forward(x, w, b, padding=1).y,
                       lambda: nhwc(F.conv2d(nchw(x).double(), w.double(), b.double(), padding=1))),
        "conv2d_dgrad": (lambda: conv2d_dgrad(dy, w, x.shape, **geo),
                         lambda: nhwc(torch.nn.grad.conv2d_input((2, 8, 9, 9), w.double(), nchw(dy).double(),
                                                                 padding=1))),
        "conv2d_wgrad": (lambda: conv2d_wgrad(xw, dyw, w.shape, need_bias=True, **geo),
                         lambda: (torch.nn.grad.conv2d_weight(nchw(xw).double(), w.shape, nchw(dyw).double(),
                                                              padding=1), dyw.double().sum((0, 1, 2)))),
        "linear_fwd": (lambda: linear_forward(xl, wl), lambda: xl.double() @ wl.double().t()),
        "linear_dgrad": (lambda: linear_dgrad(dyl, wl), lambda: dyl.double() @ wl.double()),
        "linear_wgrad": (lambda: linear_wgrad(dyl, xl),
                         lambda: (dyl.double().t() @ xl.double(), dyl.double().sum(0))),
    }
    with monkeypatch.context() as m:
        m.setattr(autotune, "pick", offer_and_keep_default)
        for ours, _ in launchers.values():
            ours()
    assert set(offered) == set(launchers)
    assert any(c.split is not None for c in offered["conv2d_wgrad"]), offered["conv2d_wgrad"]
    assert any(c.split is not None for c in offered["linear_wgrad"]), offered["linear_wgrad"]
    for kernel, (ours, ref) in launchers.items():
        expected = ref()
        for cfg in offered[kernel]:
            with autotune.forced(cfg, kernels=[kernel]):
                got = ours()
            for k, (g, e) in enumerate(zip(got, expected) if isinstance(expected, tuple) else [(got, expected)]):
                assert_close(g, e, what=f"{kernel} output {k} with {cfg}")


# --------------------------------------------------------------------------- #
# GPU tier
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
def test_tuning_a_conv_on_cuda(tune_cache):
    x = torch.randn(8, 16, 20, 20, device="cuda")
    w = torch.randn(32, 16, 3, 3, device="cuda") / 12
    b = torch.randn(32, device="cuda")
    with autotune.tuning() as stats:
        o = conv2d_forward(nhwc(x), w, b, padding=1, act="relu", stats=True)
    assert stats.tuned and not stats.cached
    entries = json.loads(tune_cache.read_text())["entries"]
    assert any(e["kernel"] == "conv2d_fwd" and e["ms"] > 0 for e in entries.values())
    ref = F.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1))
    assert_close(nchw(o.y), ref, what="tuned conv")
    assert o.psum.shape[0] * Config.from_json(next(iter(entries.values()))["config"]).block_m >= 8 * 20 * 20
    with autotune.tuning() as again:
        o2 = conv2d_forward(nhwc(x), w, b, padding=1, act="relu", stats=True)
    assert again.cached and not again.tuned
    assert torch.equal(o2.y, o.y)
    assert os.path.getsize(tune_cache) > 0

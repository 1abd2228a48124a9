"""Performance: how fast fusenet's kernels run, and how fast they could run.

Layers, in the order a benchmark flows through them:
- analytic.py   FLOPs, minimum HBM bytes and roofline floors per kernel, fused
                against unfused (what `fusenet bench` prints without a GPU);
- devices.py    the peak FLOP/s, bandwidth and L2 size of known GPUs (for MFU);
- timing.py     device-event timing: warm-up, median of repeats, rotated
                inputs, whole-step CUDA graph capture;
- contenders.py fusenet and the PyTorch baselines (eager with cuDNN, and
                torch.compile) as forward and training-step closures;
- network.py    a whole network, every contender, every batch size; each
                baseline's output checked against fusenet's;
- layers.py     per convolution: forward, dgrad and wgrad against cuDNN, and
                the fused conv group against the unfused PyTorch sequence;
- results.py    the results document: terminal tables, JSON and PNG charts;
- suite.py      the one-command GPU verification run (tests, tuning, benches).
"""
from engine.perf.analytic import H100, analytic_report, format_analytic, kernel_costs, unfused_plan

__all__ = ["H100", "analytic_report", "format_analytic", "kernel_costs", "unfused_plan"]

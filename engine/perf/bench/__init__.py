"""Performance: how fast fusenet's kernels run, and how fast they could run.

Layers, in the order a benchmark flows through them (the analytic model that
`fusenet bench` prints without a GPU is engine.perf.analytic):
- devices.py    the peak FLOP/s, bandwidth and L2 size of known GPUs (for MFU);
- timing.py     device-event timing: warm-up, median of repeats, rotated
                inputs, whole-step CUDA graph capture;
- roster.py     who competes: fusenet and the baselines, by key and label;
- contenders.py fusenet and the PyTorch baselines (eager with cuDNN, and
                torch.compile) as forward and training-step closures;
- network.py    a whole network, every contender, every batch size; each
                baseline's output checked against fusenet's;
- layers.py     per convolution: forward, dgrad and wgrad against cuDNN, and
                the fused conv group against the unfused PyTorch sequence;
- results.py    the results document: terminal tables, JSON and PNG charts;
- suite.py      the one-command GPU verification run (tests, tuning, benches).
"""

"""Performance tooling: how fast fusenet's kernels could run, and how they compile and run.

- analytic.py     FLOPs, minimum HBM bytes and roofline floors per kernel (no GPU needed);
- step.py         one training step (or inference forward) of a network, as a closure;
- aot.py          the ahead-of-time sm_80/sm_90 compile check and SASS reader (with
                  aot_worker.py, aot_cache.py, aot_report.py);
- bench/          fusenet against the PyTorch baselines on a GPU.
"""

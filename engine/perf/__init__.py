"""Performance tooling: the analytic model, the ahead-of-time SASS inspection, benchmarks."""

"""Graph IR, the op registry, block expansion and shape inference: source text to a checked graph."""

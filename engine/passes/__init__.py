"""Graph passes: small pure functions over the immutable IR."""

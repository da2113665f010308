"""Metrics: one module per metric (pure math, extractor, stateful wrapper)."""

"""Benchmarks: local pipelines against backprop and GPipe/1F1B."""

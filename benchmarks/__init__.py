"""Benchmarks: each script measures mergekit against a reference run in the same script."""

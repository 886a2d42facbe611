"""Benchmarks for the relay (see bench/README.md). Run ``python -m bench.overhead``."""

"""Benchmark models side by side: latency, parameters, FLOPs, accuracy -> bench.json."""

from .bench import BenchConfig, bench, flops_per_sample

__all__ = ["BenchConfig", "bench", "flops_per_sample"]

"""Measurements: FLOPs, latency and throughput, side by side in one run (benchmarks, not timed tests)."""

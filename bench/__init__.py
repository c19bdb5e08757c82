"""Berth benchmark: drives the real csi-driver process over its unix socket and reports latency,
throughput, start-up time and memory. Run it with `bench/run` (see bench/README.md)."""

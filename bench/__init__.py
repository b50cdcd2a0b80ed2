"""Benchmark: the gateway beside a bare proxy and a crypto-only floor (see README.md)."""

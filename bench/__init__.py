"""Benchmarks of stickyproxy: selection cost and proxied throughput."""

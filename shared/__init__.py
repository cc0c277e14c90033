"""Shared library: wire format, Redis streams transport, weight versions, HTTP health/metrics, built-in task and models."""

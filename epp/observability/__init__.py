"""Prometheus metrics, logs and decision explanations."""

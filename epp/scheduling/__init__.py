"""Scheduling: filters -> scorers (each in [0, 1], weighted) -> picker."""

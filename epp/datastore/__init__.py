"""Endpoints and their latest signals."""

"""Saturation detection and admission."""

"""Attention: the backend contract and the reference backend."""

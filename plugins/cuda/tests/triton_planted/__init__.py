"""Deliberately broken Triton kernels for the conformance self-test (see bugs.py)."""

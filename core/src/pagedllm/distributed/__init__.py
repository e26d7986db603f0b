"""Collective communication between workers."""

"""Optional vendor kernels for the CPU backend (imported lazily, only when selected)."""

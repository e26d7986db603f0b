"""Device kernels shared by backend plugins; each subpackage is behind an optional dependency.

Nothing here is imported by the core itself: ``pagedllm.kernels.triton`` needs the ``triton``
extra and is imported only by the plugins that launch its kernels (pagedllm-cuda, pagedllm-rocm).
"""

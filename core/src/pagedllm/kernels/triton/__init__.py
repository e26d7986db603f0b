"""Portable Triton kernels shared by pagedllm-cuda and pagedllm-rocm (the ``triton`` extra).

Each kernel module holds one ``@triton.jit`` kernel and its launcher; launchers take a
:class:`LaunchConfig` so each plugin supplies its own block sizes, warps and stages. Importing
this package with ``PAGEDLLM_TRITON_INTERPRET=1`` switches Triton to its CPU interpreter first.
"""

from pagedllm.kernels.interpret import enable_interpreter, interpreter_requested

if interpreter_requested():
    enable_interpreter()

try:
    import triton  # noqa: F401  (after the switch above: triton reads TRITON_INTERPRET on import)
except ImportError as exc:
    raise ImportError(
        "pagedllm.kernels.triton needs triton, an optional dependency: pip install 'pagedllm[triton]'"
    ) from exc

from pagedllm.kernels.triton.launch import LaunchConfig  # noqa: E402

__all__ = ["LaunchConfig"]

"""XLA static-shape machinery shared by pagedllm-tpu and pagedllm-neuron (the ``xla`` extra).

XLA compiles one graph per input shape, and a new shape while serving is a multi-second stall.
So every step is padded to a precompiled bucket (``buckets``), padded slots write to a reserved
dummy KV block, warm-up compiles every bucket before the engine is ready, and a counter warns
when serving compiles again. Imported only by the XLA backends; the core never imports it.
"""

try:
    import torch_xla  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "pagedllm.kernels.xla needs torch-xla, an optional dependency: pip install 'pagedllm[xla]'"
    ) from exc

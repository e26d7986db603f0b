"""pagedllm-tpu's own kernels (jax Pallas, TPU dialect); imported only when a TPU path or a test needs them."""

"""pagedllm backend for tpu."""

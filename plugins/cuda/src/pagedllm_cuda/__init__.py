"""pagedllm backend for cuda."""

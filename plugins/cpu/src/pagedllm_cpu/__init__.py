"""pagedllm backend for cpu."""

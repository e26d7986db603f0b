"""pagedllm backend for rocm."""

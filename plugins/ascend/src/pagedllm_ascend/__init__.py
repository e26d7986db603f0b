"""pagedllm backend for ascend."""

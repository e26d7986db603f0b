"""The pagedllm conformance suite."""

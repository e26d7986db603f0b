"""pagedllm backend for neuron."""

"""pagedllm-cuda: NVIDIA GPUs through the portable Triton kernels, NCCL and CUDA graphs."""

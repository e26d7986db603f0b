"""pagedllm-rocm: AMD Instinct/Radeon GPUs through the portable Triton kernels, RCCL and HIP graphs."""

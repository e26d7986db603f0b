"""The plugin API version: bump the major on any incompatible change to pagedllm.plugin."""

# 1.1: the packed_linear op and PackedWeight (GGUF blocks kept beside the dense weight).
# 1.2: K-quant formats (GGML_BLOCK_WEIGHTS), dequantize, the packed_embedding op; a layer whose
#      format packed_linear.supports keeps only its blocks (its weight is then a meta tensor).
# 1.3: PackedWeight.parts (a fused layer whose parts differ in format); packed_linear.supports may be
#      asked about a tuple of formats, one per run of rows: say yes only if the op multiplies parts.
# 1.4: AttentionSpec.kv_cache_dtype / cache_dtype (--kv-cache-dtype) and
#      AttentionBackend.supports_kv_cache_dtype (default: the model's dtype only, so older backends refuse
#      another by name); allocate_kv_cache allocates cache_dtype. The packed_linear_silu_and_mul op (a
#      gated MLP's projection and SiLU in one call, for platforms that fuse them).
# 1.5: Platform.greedy_argmax (the Sampler's greedy rows take the platform's row argmax; default
#      torch.max(...).indices, whose semantics an override keeps: first maximum, NaN as the maximum).
PLUGIN_API_VERSION: tuple[int, int] = (1, 5)

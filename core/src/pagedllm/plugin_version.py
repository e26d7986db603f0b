"""The plugin API version: bump the major on any incompatible change to pagedllm.plugin."""

# 1.1: the packed_linear op and PackedWeight (GGUF blocks kept beside the dense weight).
PLUGIN_API_VERSION: tuple[int, int] = (1, 1)

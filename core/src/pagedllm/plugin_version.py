"""The plugin API version: bump the major on any incompatible change to pagedllm.plugin."""

PLUGIN_API_VERSION: tuple[int, int] = (1, 0)

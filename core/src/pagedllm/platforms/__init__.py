"""Platforms: the abstract device, and discovery of the installed plugins that provide one."""

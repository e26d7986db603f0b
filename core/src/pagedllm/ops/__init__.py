"""Named ops that models call; platforms override them through the registry."""

from pagedllm.ops.registry import OPS, OpsRegistry, op

__all__ = ["OPS", "OpsRegistry", "op"]

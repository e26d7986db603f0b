"""The Triton path: the core's portable kernels with Ascend launch configurations, NPU graphs, the Ascend compile check.

Everything here imports triton (triton-ascend on these machines), so only the Triton path and the
interpreter twin import this package.
"""

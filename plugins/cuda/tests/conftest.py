"""Plugin tests build the platform in interpreter mode when this machine has no GPU."""

import importlib.util
import os

import torch

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    # Triton decides interpreted-or-compiled when triton and each kernel are first imported.
    os.environ["TRITON_INTERPRET"] = "1"

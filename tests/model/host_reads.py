"""A torch function mode that records host reads of tensor values (each one waits for the device on a GPU) and
uploads of host values: the batched reducers' tests count them."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "argwhere", "numpy", "cpu",
              "masked_select", "unique", "bincount", "repeat_interleave"}  # fmt: skip
UPLOADS = {"tensor", "as_tensor"}  # host values to the device (a CUDA copy from pinned memory waits for nothing)


class HostReads(TorchFunctionMode):
    """Records the calls that read tensor values on the host (on a GPU each one waits for the device) and those
    that make tensors from host values."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.uploads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name == "__getitem__" and len(args) > 1 else None
        masked = isinstance(index, torch.Tensor) and index.dtype == torch.bool
        if name in HOST_READS or masked or (name == "where" and len(args) + len(kwargs or {}) == 1):
            self.calls.append(name)
        if name in UPLOADS:
            self.uploads.append(name)
        return func(*args, **(kwargs or {}))

"""The ``compute_dtype`` op option: the activation dtype the vendor kernels run in."""

import torch

COMPUTE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_dtype(op_name: str, value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in COMPUTE_DTYPES.values():
        return value
    if value in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[value]
    raise ValueError(f"{op_name}: compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {value!r}")

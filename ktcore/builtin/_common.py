"""Helpers shared by the built-in torch ops."""

from __future__ import annotations

import torch



def parse_dtype(value, op_name: str) -> torch.dtype | None:
    """A dtype from a rule file's ``op_kwargs`` (``"bfloat16"``, ``"torch.float16"``) or a ``torch.dtype``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{op_name}: dtype {value!r} is not a torch floating point dtype (e.g. 'bfloat16')")
    return dtype


def module_dtype(module: torch.nn.Module, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The floating dtype of a (meta) module's first floating parameter: the dtype the model was built in."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return fallback


def check_shape(op_name: str, qt, expected: tuple[int, ...]) -> None:
    if tuple(qt.shape) != tuple(expected):
        where = f" in {qt.source}" if getattr(qt, "source", "") else ""
        raise ValueError(f"{op_name}: tensor '{qt.name}'{where} has shape {tuple(qt.shape)}, expected {tuple(expected)}")


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """``[q_len, kv_len]`` bool mask, True where a query may attend: the queries are the last ``q_len``
    positions of the ``kv_len`` keys (bottom-right aligned, as after a cache update)."""
    offset = kv_len - q_len
    q = torch.arange(q_len, device=device)[:, None] + offset
    k = torch.arange(kv_len, device=device)[None, :]
    return k <= q

"""Decode-time fusion of the linears that read one input: q/k/v projections, gate/up of an MLP.

Model code calls them one after the other on the same tensor (``q_proj(x); k_proj(x); v_proj(x)``). The core
declares such groups at inject time (``Op.declare_siblings``, from ``ktcore.modules.SIBLING_LINEARS``), so
the group is known before the first call: the first member called with a decode-sized input computes every
member's output in one ``Runtime.linear_multi`` call (the input quantized once, one parallel phase) and
keeps a copy of the input; another member then returns its output computed ahead if its input equals that
copy (a decode step's input is a few KB: comparing costs less than a dispatch, and no in-place change,
which inference tensors do not count in a version counter, can slip through). Members may come in any
order, and other calls may come in between. An output computed ahead and not taken (a member called on
another input, or not called at all) is wasted work: after ``MAX_MISSES`` such misses in a row the group
dissolves for good and its members run one by one. ``KT_CPU_FUSE=0`` turns fusion off.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("KT_CPU_FUSE", "1") != "0"
MAX_MISSES = 3


def _same_values(copy: torch.Tensor, x: torch.Tensor) -> bool:
    return copy.shape == x.shape and copy.dtype == x.dtype and copy.device == x.device and torch.equal(copy, x)


class Siblings:
    """A declared group of ``KLinearCPU`` ops on one input (a plain object: ops are modules, and a module
    stored as an attribute of another would become its child)."""

    __slots__ = ("ops", "active", "weights", "ahead", "ahead_x", "misses")

    def __init__(self, ops: list):
        self.ops = list(ops)
        self.active = ENABLED and len(self.ops) > 1
        self.weights = None  # the members' packed weights, in order, once every member is ready
        self.ahead: dict = {}  # op -> its output computed by another member for ahead_x
        self.ahead_x = None
        self.misses = 0

    def reset(self) -> None:
        """A member was (re)loaded: plan again at the next call."""
        self.weights, self.ahead, self.ahead_x = None, {}, None

    def dissolve(self) -> None:
        self.active = False
        self.weights, self.ahead, self.ahead_x = None, {}, None

    def take(self, op, x: torch.Tensor):
        """``op``'s output computed ahead for ``x``'s values, else ``None`` (then ``op`` computes)."""
        ahead = self.ahead
        if not ahead:
            return None
        y = ahead.pop(op, None)
        if y is not None and _same_values(self.ahead_x, x):
            self.misses = 0
            if not ahead:
                self.ahead_x = None
            return y
        self.ahead, self.ahead_x = {}, None
        self.misses += 1
        if self.misses >= MAX_MISSES:
            self.dissolve()
        return None

    def plan(self, runtime) -> bool:
        """Whether the group can run as one call on ``runtime`` (each member loaded, on the same runtime,
        with the same inputs); dissolves it if not."""
        if self.weights is None:
            for op in self.ops:
                if op.weight is not None and op._runtime is None:
                    op._resolve_runtime()
            if not all(op.weight is not None and op._runtime is runtime and op.in_features == self.ops[0].in_features
                       for op in self.ops):
                self.dissolve()
                return False
            self.weights = [op.weight for op in self.ops]
        return True

    def compute(self, op, x: torch.Tensor, x2: torch.Tensor, rows: int, runtime) -> torch.Tensor:
        """Every member's output for ``x`` (``x2``: it as contiguous float32 on the CPU) in one call; the
        others' are kept for them; returns ``op``'s."""
        lead = tuple(x.shape[:-1])
        ys = [torch.empty((*lead, member.out_features), dtype=torch.float32) for member in self.ops]
        runtime.linear_multi(self.weights, rows, x2.data_ptr(), [y.data_ptr() for y in ys])
        dtype = x.dtype
        mine = None
        ahead = {}
        for member, y in zip(self.ops, ys):
            y = member._finish(y, dtype)
            if member is op:
                mine = y
            else:
                ahead[member] = y
        if self.active:
            self.ahead, self.ahead_x = ahead, x.clone()
        return mine

"""Decode-time fusion of the linears that read one input: q/k/v projections, gate/up of an MLP.

Model code calls them one after the other on the same tensor (``q_proj(x); k_proj(x); v_proj(x)``). Ops are
built without knowing their neighbours, so the pairs are learned: when a ``KLinearCPU`` call of decode size
gets the very tensor the previous one got (same storage address, shape, strides and dtype, while a
reference keeps that tensor alive, so no other tensor can have the address), the op joins the previous
op's group. From then on the group's first op (the leader) computes every member's output in one
``Runtime.linear_multi`` call (the input quantized once, one parallel phase) and keeps a copy of the input;
a member returns its output only if it is called next, in order, with an input equal to that copy (a
decode step's input is a few KB: comparing costs less than a dispatch, and no in-place change, which
inference tensors do not count in a version counter, can slip through). Any other call in between drops
the outputs computed ahead and dissolves the group for good (those ops then run one by one).
``KT_CPU_FUSE=0`` turns the learning off.
"""

from __future__ import annotations

import os
import threading

import torch


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def _same_values(copy: torch.Tensor, x: torch.Tensor) -> bool:
    return copy.shape == x.shape and copy.dtype == x.dtype and copy.device == x.device and torch.equal(copy, x)


ENABLED = os.environ.get("KT_CPU_FUSE", "1") != "0"


class Slot:
    """An op's place in a group (a plain object: ops are modules, and a module stored as an attribute of
    another would become its child)."""

    __slots__ = ("op", "leader", "followers", "disabled")

    def __init__(self, op):
        self.op = op
        self.leader: Slot | None = None
        self.followers: list[Slot] = []
        self.disabled = False


class _State(threading.local):
    def __init__(self):
        self.last = None  # (slot, x) of the previous decode-sized call, computed on its own
        self.ahead: list = []  # [(slot, y)]: outputs computed by the leader, in call order
        self.ahead_x = None  # a copy of the leader's input


_state = _State()


def _dissolve(leader: Slot) -> None:
    for slot in [leader, *leader.followers]:
        slot.leader, slot.followers, slot.disabled = None, [], True


def _drop_ahead(s) -> None:
    leader = s.ahead[0][0].leader
    s.ahead, s.ahead_x = [], None
    if leader is not None:
        _dissolve(leader)


def take_ahead(slot: Slot, x: torch.Tensor):
    """The op's output if its group's leader already computed it for ``x``, else ``None``."""
    s = _state
    if not s.ahead:
        return None
    nxt, y = s.ahead[0]
    if nxt is slot and _same_values(s.ahead_x, x):
        s.ahead.pop(0)
        if not s.ahead:
            s.ahead_x = None
        s.last = None
        return y
    _drop_ahead(s)
    return None


def learn(slot: Slot, x: torch.Tensor, compatible) -> None:
    """Record a decode-sized call computed on its own; join the previous op's group when it got the same
    input and ``compatible(leader_op, op)``."""
    if not ENABLED:
        return
    s = _state
    last = s.last
    if (last is not None and last[0] is not slot and not slot.disabled and slot.leader is None
            and not slot.followers and _same_tensor(last[1], x)):
        leader = last[0].leader or last[0]
        if not leader.disabled and compatible(leader.op, slot.op):
            leader.followers.append(slot)
            slot.leader = leader
    s.last = (slot, x)


def forget() -> None:
    """A call that is not decode-sized: nothing learned or computed ahead carries over it."""
    s = _state
    if s.ahead:
        _drop_ahead(s)
    s.last = None


def put_ahead(x: torch.Tensor, outputs: list) -> None:
    """The leader computed ``outputs`` (``[(slot, y)]`` of its followers, in order) for ``x``."""
    s = _state
    s.ahead = outputs
    s.ahead_x = x.clone()
    s.last = None

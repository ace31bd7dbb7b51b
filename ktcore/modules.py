"""Wrapper modules that take a Transformers module's place and run it through registered ops.

A wrapper keeps the original module's qualified name and children (so ``...self_attn.q_proj.weight``
stays valid and rules still match inside it), holds a prefill op and a generate op (one shared instance
when both are the same class on the same device) and picks one per call: the generate op when a call
carries at most ``prefill_threshold`` tokens per sequence (default 1: decode steps), else the prefill op.
Inputs move to the chosen op's device; the output moves to ``out_device`` (default: where the input was).

``KExperts`` also runs asynchronously: ``submit(...)`` then ``sync()``, through the op's own ``submit``/``sync``
when it has them (see ``ktcore.hookspecs.experts``), so a caller (``ktcore.moe.KMoE``) computes the shared
experts on the GPU while the routed experts run on the CPU. When the inputs live on a CUDA device and the op
also has ``stream_submit``/``stream_sync`` (and ``stream_problem`` says nothing against it), the work is
enqueued on the current CUDA stream instead: no host-side wait, and capturable into a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .ops import Op

# Options a rule's ``replace.kwargs`` may give a wrapper (the KTransformers spellings).
WRAPPER_OPTIONS = (
    "op",
    "prefill_op",
    "generate_op",
    "prefill_device",
    "generate_device",
    "out_device",
    "prefill_threshold",
    "op_kwargs",
)

# Wrapper attributes a call's plan (``KModule._call_plan``) is made of: setting one drops the plan.
_PLAN_INPUTS = frozenset({"prefill_op", "generate_op", "out_device", "prefill_threshold"})

# Linears that model code calls one after the other on the same input, by child name under one parent
# (first group that names at least two of a parent's KLinear children wins; a linear joins one group).
SIBLING_LINEARS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("q_proj", "kv_a_proj_with_mqa"),  # DeepSeek MLA without q LoRA
    ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek MLA with q LoRA
)


def module_role(module: nn.Module) -> str | None:
    """The role a Transformers module plays (``linear``, ``experts``, ``attention``, ``rope``), if any."""
    if isinstance(module, KModule):
        return module.role
    if isinstance(module, nn.Linear):
        return "linear"
    params = {name: p for name, p in module._parameters.items() if p is not None}
    cls_name = type(module).__name__
    if "down_proj" in params and params["down_proj"].dim() == 3:
        return "experts"
    if cls_name.endswith("Experts"):
        return "experts"
    if cls_name.endswith("RotaryEmbedding"):
        return "rope"
    if cls_name.endswith("Attention"):
        return "attention"
    if "gate" in module._modules and "experts" in module._modules:
        return "moe"  # a sparse MoE block: router + routed experts (+ shared experts)
    return None


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _all_on(values, device: torch.device) -> bool:
    return all(v.device == device for v in values if isinstance(v, torch.Tensor)) and not any(
        isinstance(v, (tuple, list, dict)) for v in values
    )


def _queue_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without waiting where that is safe: a copy to an accelerator is queued on its
    stream (later kernels there see the data); a copy to the CPU waits, as the CPU reads it at once."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type != "cpu")


class KModule(nn.Module):
    """Base of the wrappers. ``role`` says which ops it runs; subclasses define ``forward``."""

    role: ClassVar[str] = ""
    uses_ops: ClassVar[bool] = True  # False: a wrapper that runs its (adopted) children, no ops of its own
    rule_options: ClassVar[tuple[str, ...]] = WRAPPER_OPTIONS  # what a rule's replace.kwargs may give it

    def __init__(
        self,
        original: nn.Module,
        *,
        prefill_op: type[Op],
        generate_op: type[Op] | None = None,
        prefill_device: torch.device | str = "cpu",
        generate_device: torch.device | str | None = None,
        out_device: torch.device | str | None = None,
        prefill_threshold: int = 1,
        op_kwargs: Mapping[str, Any] | None = None,
        name: str = "",
        build: bool = True,
    ):
        super().__init__()
        self._adopt(original, name)
        self.prefill_op_cls = prefill_op
        self.generate_op_cls = generate_op or prefill_op
        self.prefill_device = torch.device(prefill_device)
        self.generate_device = torch.device(generate_device) if generate_device is not None else self.prefill_device
        self.out_device = torch.device(out_device) if out_device is not None else None
        if int(prefill_threshold) < 1:
            raise ValueError(f"{type(self).__name__} {name}: prefill_threshold must be >= 1, got {prefill_threshold}")
        self.prefill_threshold = int(prefill_threshold)
        self.op_kwargs = dict(op_kwargs or {})
        if build:
            self.build_ops()

    # -- construction --------------------------------------------------------------------------------

    def _adopt(self, original: nn.Module, name: str) -> None:
        # the original stays reachable (ops read shapes/config from it) without being a child
        self.__dict__["original"] = original
        self.qualname = name
        for child_name, child in original._modules.items():
            self._modules[child_name] = child

    @classmethod
    def check_option(cls, key: str, value: Any) -> str | None:
        """Why a rule's ``replace.kwargs`` value is invalid (``None``: fine). Used for wrappers without ops;
        the op options of the others are checked by the rule loader itself."""
        return None

    def build_ops(self) -> None:
        """Build the ops from the original module. Called after every rule was applied, so that an op that
        reads the original's children (attention projections) sees their final replacements."""
        prefill = self.prefill_op_cls(self.original, self.prefill_device, **self.op_kwargs)
        if self.generate_op_cls is self.prefill_op_cls and self.generate_device == self.prefill_device:
            generate = prefill
        else:
            generate = self.generate_op_cls(self.original, self.generate_device, **self.op_kwargs)
        self.prefill_op = prefill
        self.generate_op = generate

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _PLAN_INPUTS:
            self.__dict__.pop("_plan", None)

    def _call_plan(self) -> tuple:
        """``(generate op, prefill op, prefill_threshold, keeps device)``, decided once: a decode step makes
        hundreds of calls, and each lookup through ``nn.Module.__getattr__`` (twice, with ours) costs."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            modules = self._modules
            if "generate_op" not in modules:
                raise RuntimeError(f"{type(self).__name__} {self.qualname}: called before build_ops()")
            plan = (modules["generate_op"], modules["prefill_op"], self.prefill_threshold, self.out_device is None)
            self.__dict__["_plan"] = plan
        return plan

    def replace_child(self, name: str, module: nn.Module) -> None:
        """Swap an adopted child here and in the original (which the ops hold)."""
        self._modules[name] = module
        self.original._modules[name] = module

    def ops(self) -> list[Op]:
        """The distinct op instances (one when prefill and generate share it)."""
        ops = [self.prefill_op]
        if self.generate_op is not self.prefill_op:
            ops.append(self.generate_op)
        return ops

    # -- weights -------------------------------------------------------------------------------------

    def weight_names(self) -> list[str]:
        """Local names of the tensors this wrapper's ops load (``prefix + "." + name`` in the source)."""
        return []

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes the loaded tensors must have (from the original module), where known."""
        return {}

    def fetch(self, source, prefix: str) -> dict[str, Any]:
        return {local: source.get(f"{prefix}.{local}" if prefix else local) for local in self.weight_names()}

    def load_weights(self, weights: Mapping[str, Any]) -> None:
        for op in self.ops():
            op.load(weights)

    def load_from(self, source, prefix: str) -> None:
        self.load_weights(self.fetch(source, prefix))

    # -- calls ---------------------------------------------------------------------------------------

    def _pick(self, tokens_per_sequence: int) -> tuple[Op, bool]:
        """The op for a call of that many tokens per sequence, and whether outputs stay where it computes."""
        generate, prefill, threshold, keeps_device = self.__dict__.get("_plan") or self._call_plan()
        return (generate if tokens_per_sequence <= threshold else prefill), keeps_device

    def pick(self, tokens_per_sequence: int) -> Op:
        return self._pick(tokens_per_sequence)[0]

    def _run(self, tokens: int, out_like: torch.Tensor, *args, **kwargs):
        op, keeps_device = self._pick(tokens)
        device = op.device
        if keeps_device and out_like.device == device and _all_on(args, device) and _all_on(kwargs.values(), device):
            # the common case (a decode step makes hundreds of these calls): nothing to move, no module hooks
            return op.forward(*args, **kwargs)
        out = op(*_move(args, device), **_move(kwargs, device))
        return _move(out, self.out_device if self.out_device is not None else out_like.device)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            # plain attributes (config, layer_idx, head_dim, ...) that Transformers code reads from the
            # module it replaced; the original's meta tensors are never handed out
            if original is not None and name not in original._parameters and name not in original._buffers:
                if name in original.__dict__ or hasattr(type(original), name):
                    return getattr(original, name)
            raise

    def extra_repr(self) -> str:
        gen = self.generate_op_cls.name
        pre = self.prefill_op_cls.name
        ops = (
            f"op={pre}@{self.prefill_device}"
            if pre == gen and self.prefill_device == self.generate_device
            else f"prefill_op={pre}@{self.prefill_device}, generate_op={gen}@{self.generate_device}"
        )
        out = f", out_device={self.out_device}" if self.out_device is not None else ""
        return f"{ops}{out}, prefill_threshold={self.prefill_threshold}"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return module_role(module) == cls.role


class KLinear(KModule):
    """Replaces an ``nn.Linear``: ``forward(x[..., in]) -> [..., out]``."""

    role = "linear"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def weight_names(self) -> list[str]:
        return ["weight"] + (["bias"] if self.original.bias is not None else [])

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self.original._parameters[name].shape) for name in self.weight_names()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[-2] if x.dim() >= 2 else 1
        op, keeps_device = self._pick(tokens)
        if keeps_device and (x.is_cpu if op.device.type == "cpu" else x.device == op.device):
            return op.forward(x)  # nothing to move (the decode path: hundreds of calls per step)
        return self._run(tokens, x, x)


class KExperts(KModule):
    """Replaces a Transformers 5 fused experts module; called exactly like it:
    ``forward(hidden_states[T, H], top_k_index[T, K], top_k_weights[T, K]) -> [T, H]``."""

    role = "experts"

    # False: never take the op's stream-ordered path (the synchronous submit/sync reference)
    stream_ordered: bool = True

    def __init__(self, original: nn.Module, **kwargs):
        super().__init__(original, **kwargs)
        # (op that has the work, or None; finished output, or None; out device; stream-ordered)
        self._pending = None
        self._stream_ok: dict[tuple, bool] = {}

    def weight_names(self) -> list[str]:
        names = ["gate_proj", "up_proj", "down_proj"]
        if self.original._parameters.get("gate_up_proj_bias") is not None:  # GPT-OSS
            names += ["gate_proj_bias", "up_proj_bias", "down_proj_bias"]
        stored = [getattr(cls, "stored_down_proj", False) for cls in (self.prefill_op_cls, self.generate_op_cls)]
        if any(stored):  # [E, H, I] as the file stores it (WeightSource): the transposed down_proj only if an op reads it
            names[names.index("down_proj")] = "down_proj_stored"
            if not all(stored):
                names.append("down_proj")
        return names

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        params = self.original._parameters
        shapes = {}
        if params.get("gate_up_proj") is not None:  # Transformers' fused [E, 2*I, H] (GPT-OSS: [E, H, 2*I])
            experts, rows, hidden = params["gate_up_proj"].shape
            if getattr(self.original, "is_transposed", False):
                rows, hidden = hidden, rows
            shapes["gate_proj"] = shapes["up_proj"] = (experts, rows // 2, hidden)
        if params.get("down_proj") is not None:
            shapes["down_proj"] = tuple(params["down_proj"].shape)
        return shapes

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[0] if hidden_states.dim() == 2 else hidden_states.shape[-2]
        if hidden_states.is_cuda and self.stream_path(self.pick(tokens), hidden_states, tokens):
            self.submit(hidden_states, top_k_index, top_k_weights)
            return self.sync()
        return self._run(tokens, hidden_states, hidden_states, top_k_index, top_k_weights)

    def stream_path(self, op: Op, hidden_states: torch.Tensor, tokens: int) -> bool:
        """Whether this call goes through ``op.stream_submit``/``stream_sync`` (see the module docstring)."""
        if not self.stream_ordered or hidden_states.device.type != "cuda" or not is_stream_experts_op(op):
            return False
        key = (id(op), tokens, hidden_states.device)
        ok = self._stream_ok.get(key)
        if ok is None:
            ok = self._stream_ok[key] = op.stream_problem(hidden_states.device, tokens) is None
        return ok

    def submit(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Start the routed experts; ``sync()`` returns their output. Through the op's ``submit``/``sync``
        when it has them (the work then runs while the caller goes on), else the op runs here and now."""
        if self._pending is not None:
            raise RuntimeError(f"KExperts {self.qualname}: submit while a previous submit was not synced")
        tokens = hidden_states.shape[0] if hidden_states.dim() == 2 else hidden_states.shape[-2]
        op = self.pick(tokens)
        out_device = self.out_device if self.out_device is not None else hidden_states.device
        if self.stream_path(op, hidden_states, tokens):
            op.stream_submit(hidden_states, top_k_index, top_k_weights)
            self._pending = (op, None, out_device, True)
            return
        args = [_queue_to(t, op.device) for t in (hidden_states, top_k_index, top_k_weights)]
        if is_async_experts_op(op):
            op.submit(*args)
            self._pending = (op, None, out_device, False)
        else:
            self._pending = (None, op(*args), out_device, False)

    def sync(self) -> torch.Tensor:
        """The output of the last ``submit``, on ``out_device`` (default: where its input was)."""
        if self._pending is None:
            raise RuntimeError(f"KExperts {self.qualname}: sync without submit")
        op, out, out_device, stream = self._pending
        self._pending = None
        if op is not None:
            out = op.stream_sync() if stream else op.sync()
        return _queue_to(out, out_device)

    def drop_pending(self) -> None:
        """Forget a submit whose sync will never come (a CUDA graph capture that failed half-way)."""
        self._pending = None
        for op in self.ops():
            drop = getattr(op, "stream_drop", None)
            if callable(drop):
                drop()


def declare_sibling_linears(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Hand every group of sibling linears (``SIBLING_LINEARS``: KLinear children of one parent that model
    code calls one after the other on the same input) to their ops' ``Op.declare_siblings``, the generate
    ops together and the prefill ops together. Returns ``(parent name, member names)`` per group."""
    groups = []
    for parent_name, parent in model.named_modules():
        children = parent._modules
        taken: set[str] = set()
        for names in SIBLING_LINEARS:
            members = tuple(n for n in names if n not in taken and isinstance(children.get(n), KLinear)
                            and "generate_op" in children[n]._modules)
            if len(members) < 2:
                continue
            taken.update(members)
            groups.append((parent_name, members))
            declared = []
            for role in ("generate_op", "prefill_op"):
                ops = [children[n]._modules[role] for n in members]
                if any(all(a is b for a, b in zip(ops, seen)) for seen in declared):  # one op for both
                    continue
                declared.append(ops)
                for op in ops:
                    op.declare_siblings(list(ops))
    return groups


def declare_output_head(model: nn.Module) -> None:
    """Tell the ops of the model's output head (``get_output_embeddings()``, when a ``KLinear``) what they compute
    (``Op.declare_output_head``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, KLinear):
        for op in head.ops():
            op.declare_output_head()


def is_stream_experts_op(op: Op) -> bool:
    """Whether an experts op implements the stream-ordered contract (``stream_submit``, ``stream_sync`` and
    ``stream_problem(device, tokens)``)."""
    return all(callable(getattr(op, n, None)) for n in ("stream_submit", "stream_sync", "stream_problem"))


def is_async_experts_op(op: Op) -> bool:
    """Whether an experts op implements the asynchronous contract (``submit`` and ``sync``)."""
    return callable(getattr(op, "submit", None)) and callable(getattr(op, "sync", None))


class KAttention(KModule):
    """Replaces a layer's attention module; takes the same arguments (all forwarded) and returns
    ``(attn_output, attn_weights_or_None)``. Its projections stay its children."""

    role = "attention"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return True  # attention modules share no base class; a rule names them explicitly

    def weight_names(self) -> list[str]:
        # tensors of the attention module itself, not of its adopted children (GPT-OSS's sinks)
        return [n for n, p in self.original._parameters.items() if p is not None]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        tokens = hidden_states.shape[-2] if hidden_states.dim() >= 2 else 1
        return self._run(tokens, hidden_states, hidden_states, *args, **kwargs)


class KRoPE(KModule):
    """Replaces a rotary embedding module: ``forward(x, position_ids) -> (cos, sin)``."""

    role = "rope"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return True

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        tokens = position_ids.shape[-1] if position_ids.dim() >= 1 else 1
        return self._run(tokens, x, x, position_ids, *args, **kwargs)


WRAPPERS: dict[str, type[KModule]] = {"KLinear": KLinear, "KExperts": KExperts, "KAttention": KAttention, "KRoPE": KRoPE}

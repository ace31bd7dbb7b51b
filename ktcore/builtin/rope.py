"""``KRoPETorch``: a rotary embedding module's output, read from tables computed when the op is built."""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..ops import ANY_DEVICE, Op, stream_capturing

# rope types whose frequencies depend only on the config (dynamic NTK and longrope change with the length)
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
# model types whose rotary module returns complex ``freqs_cis`` instead of ``(cos, sin)``
COMPLEX_ROPE_MODEL_TYPES = ("deepseek_v2",)
FORMS = ("cos_sin", "complex")


def rope_parameters_by_layer_type(config) -> dict[str | None, dict]:
    """``{layer_type: rope parameters}``; the key is ``None`` when the model has one set for all layers."""
    params = config.rope_parameters
    if isinstance(params, dict) and "rope_type" not in params and params:
        return {layer_type: p for layer_type, p in params.items() if p is not None}
    return {None: params}


def inv_freq_and_scaling(config, module_cls=None, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies and the cos/sin scaling Transformers computes for ``config``."""
    params = rope_parameters_by_layer_type(config)[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"KRoPETorch: rope type {rope_type!r} ({config.model_type}) is not supported; it supports {', '.join(STATIC_ROPE_TYPES)}"
        )
    extra = {"layer_type": layer_type} if layer_type is not None else {}
    with torch.device("cpu"):
        if rope_type != "default":
            return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **extra)
        default = getattr(module_cls, "compute_default_rope_parameters", None)
        if default is not None:
            return default(config, **extra)
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(dim * params.get("partial_rotary_factor", 1.0))
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


class KRoPETorch(Op):
    """``forward(x, position_ids[, layer_type]) -> (cos, sin)`` (or complex ``freqs_cis`` for DeepSeek-V2),
    bit-identical to the Transformers rotary module it replaces for the static rope types.

    Tables hold ``positions x frequencies`` in fp32 exactly as Transformers multiplies them, up to
    ``max_position_embeddings`` (at most ``table_positions``, default 4096, at build; grown on demand).
    They are computed on the CPU when the op is built and moved to the op's device by ``load()``.
    Options: ``form`` (``cos_sin`` or ``complex``; default from the model type), ``table_positions``.
    """

    name = "KRoPETorch"
    graph_capturable = True
    role = "rope"
    devices = ANY_DEVICE

    def __init__(self, module: torch.nn.Module, device="cpu", form: str | None = None, table_positions: int = 4096, **kwargs):
        super().__init__(module, device, **kwargs)
        config = module.config
        self.form = form or ("complex" if config.model_type in COMPLEX_ROPE_MODEL_TYPES else "cos_sin")
        if self.form not in FORMS:
            raise ValueError(f"{self.name}: form must be one of {FORMS}, got {form!r}")
        self.layer_types = list(rope_parameters_by_layer_type(config))
        self.attention_scaling: dict[str | None, float] = {}
        for i, layer_type in enumerate(self.layer_types):
            inv_freq, scaling = inv_freq_and_scaling(config, type(module), layer_type)
            self.register_buffer(f"inv_freq_{i}", inv_freq.float().cpu(), persistent=False)
            self.attention_scaling[layer_type] = float(scaling)
        positions = min(int(table_positions), int(getattr(config, "max_position_embeddings", table_positions)))
        self._build_tables(max(positions, 1))

    def _build_tables(self, positions: int) -> None:
        self.table_positions = positions
        pos = torch.arange(positions, device=self.inv_freq_0.device).float()[:, None]
        for i, layer_type in enumerate(self.layer_types):
            freqs = pos * getattr(self, f"inv_freq_{i}")[None, :]
            scaling = self.attention_scaling[layer_type]
            if self.form == "complex":
                self.register_buffer(f"freqs_cis_{i}", torch.polar(torch.ones_like(freqs), freqs) * scaling, persistent=False)
            else:
                emb = torch.cat((freqs, freqs), dim=-1)
                self.register_buffer(f"cos_{i}", emb.cos() * scaling, persistent=False)
                self.register_buffer(f"sin_{i}", emb.sin() * scaling, persistent=False)

    def load(self, weights) -> None:
        self.to(self.device)

    def _index(self, layer_type: str | None) -> int:
        if layer_type is None and self.layer_types != [None]:
            raise ValueError(f"{self.name}: this model has per-layer-type rope ({self.layer_types}); pass layer_type")
        try:
            return self.layer_types.index(layer_type)
        except ValueError:
            raise ValueError(f"{self.name}: unknown layer_type {layer_type!r}; known: {self.layer_types}") from None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None):
        i = self._index(layer_type if self.layer_types != [None] else None)
        if not stream_capturing(position_ids):  # under capture, prepare_capture grew the tables already
            needed = int(position_ids.max()) + 1 if position_ids.numel() else 0
            if needed > self.table_positions:
                self._build_tables(max(needed, 2 * self.table_positions))
        position_ids = position_ids.to(self.inv_freq_0.device)
        if self.form == "complex":
            return getattr(self, f"freqs_cis_{i}")[position_ids]
        cos = getattr(self, f"cos_{i}")[position_ids]
        sin = getattr(self, f"sin_{i}")[position_ids]
        return cos.to(x.dtype), sin.to(x.dtype)

    def prepare_capture(self, max_positions: int) -> None:
        if max_positions > self.table_positions:
            self._build_tables(max_positions)

    def extra_repr(self) -> str:
        return f"form={self.form}, layer_types={self.layer_types}, table_positions={self.table_positions}"

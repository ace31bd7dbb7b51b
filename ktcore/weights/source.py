"""What every weight source offers: Transformers-named tensors, kept as the file stores them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from .tensor import QuantizedTensor


@runtime_checkable
class WeightSource(Protocol):
    """A set of model tensors under Transformers names.

    Names are those of the Transformers model's ``state_dict()``, with one addition: a fused experts
    module ``<p>.experts`` is also offered as ``<p>.experts.gate_proj``, ``<p>.experts.up_proj`` and
    ``<p>.experts.down_proj`` (each ``[num_experts, out, in]``), which is what experts ops load, so that
    quantized gate and up blocks are never copied into one ``gate_up_proj``. ``get("<p>.experts.gate_up_proj")``
    still works (for plain Transformers modules) and concatenates. Where Transformers' ``down_proj`` is
    ``[E, I, H]`` (GGUF sources: GPT-OSS and Llama 4; ``StateDictSource``: GPT-OSS), ``<p>.experts.down_proj_stored``
    is also offered, ``[E, H, I]`` (llama.cpp's layout, kept quantized): ``KExperts`` loads it for ops that set
    ``stored_down_proj``.
    """

    path: str

    def names(self) -> Iterator[str]:
        """Every tensor name this source can give."""
        ...

    def get(self, name: str) -> QuantizedTensor:
        """The tensor ``name``; raises ``MissingTensorError`` naming the file and tensor if absent."""
        ...

    def config(self):
        """The ``transformers.PretrainedConfig`` the weights belong to."""
        ...

    def tokenizer(self):
        """A ``transformers`` tokenizer (with chat template when the file has one), or ``None``."""
        ...


class WeightError(ValueError):
    """A weight file or tensor is unusable; the message names the file and the tensor."""


class MissingTensorError(WeightError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""

"""``SafetensorsSource``: a Hugging Face model directory (``config.json`` + ``*.safetensors``).

Each file's header is parsed here and tensors are handed out as views on a memory map of the file (no
copy), as F32/F16/BF16 ``QuantizedTensor``. Per-expert checkpoint tensors
(``...experts.<e>.gate_proj.weight``) are stacked into the fused experts names of Transformers 5.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .source import MissingTensorError, WeightError
from .tensor import QuantizedTensor

_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<part>gate_up_proj|gate_proj|up_proj|down_proj)$")
# checkpoint spellings of one expert's projections (Mixtral uses w1/w3/w2)
_PER_EXPERT = {"gate_proj": ("gate_proj", "w1"), "up_proj": ("up_proj", "w3"), "down_proj": ("down_proj", "w2")}


class _Entry:
    __slots__ = ("file", "dtype", "shape", "start", "end")

    def __init__(self, file: Path, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


class SafetensorsSource:
    format = "safetensors"

    def __init__(self, path: str | os.PathLike, model_path: str | os.PathLike | None = None):
        p = Path(path)
        self.dir = p if p.is_dir() else p.parent
        self.path = str(self.dir)
        self.model_path = str(model_path) if model_path is not None else str(self.dir)
        files = sorted(self.dir.glob("*.safetensors")) if p.is_dir() else [p]
        if not files:
            raise WeightError(f"{self.dir}: no .safetensors file")
        self._entries: dict[str, _Entry] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            self._read_header(f)
        self._config = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    @staticmethod
    def can_open(path: str | os.PathLike) -> bool:
        p = Path(path)
        if p.is_dir():
            return any(p.glob("*.safetensors"))
        return p.suffix == ".safetensors"

    def _read_header(self, f: Path) -> None:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightError(f"{f}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise WeightError(f"{f}: header length {n} exceeds the file size {size} (truncated?)")
            try:
                header = json.loads(fh.read(n))
            except ValueError as e:
                raise WeightError(f"{f}: corrupt safetensors header: {e}") from e
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if base + end > size:
                raise WeightError(f"{f}: tensor {name!r} ends at byte {base + end}, past the file end {size} (truncated?)")
            self._entries[name] = _Entry(f, info["dtype"], tuple(info["shape"]), base + start, base + end)

    def _raw(self, name: str) -> QuantizedTensor:
        e = self._entries[name]
        if e.dtype not in _DTYPES:
            raise WeightError(f"{e.file}: tensor {name!r} has dtype {e.dtype}; supported: {', '.join(_DTYPES)}")
        mm = self._maps.get(e.file)
        if mm is None:
            mm = self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="c")
        return QuantizedTensor(name, _DTYPES[e.dtype], e.shape, torch.from_numpy(mm[e.start : e.end]), str(e.file))

    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.model_path)
        return self._config

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_path)
        except (OSError, ValueError, TypeError):
            return None

    def _expert_names(self, prefix: str, part: str) -> list[str] | None:
        """Per-expert checkpoint names for the fused ``prefix`` (``...mlp.experts``), or None."""
        prefixes = [prefix, prefix.replace(".mlp.experts", ".block_sparse_moe.experts")]
        for pre in prefixes:
            for spelling in _PER_EXPERT[part]:
                names = []
                e = 0
                while f"{pre}.{e}.{spelling}.weight" in self._entries:
                    names.append(f"{pre}.{e}.{spelling}.weight")
                    e += 1
                if names:
                    return names
        return None

    def _expected(self) -> dict[str, tuple[int, ...]]:
        if self._shapes is None:
            from .gguf_source import expected_shapes

            shapes = expected_shapes(self.config())
            for name, shape in list(shapes.items()):
                m = _EXPERT_RE.match(name)
                if m and m["part"] == "gate_up_proj":
                    half = (shape[0], shape[1] // 2, *shape[2:])
                    shapes[f"{m['prefix']}.gate_proj"] = half
                    shapes[f"{m['prefix']}.up_proj"] = half
            self._shapes = shapes
        return self._shapes

    def _checkpoint_name(self, name: str) -> str | None:
        """The file's spelling of a plain (non-experts) tensor: as is, or Mixtral's ``block_sparse_moe``."""
        for candidate in (name, name.replace(".mlp.", ".block_sparse_moe.")):
            if candidate in self._entries:
                return candidate
        return None

    def _available(self, name: str) -> bool:
        m = _EXPERT_RE.match(name)
        if m and self._checkpoint_name(name) is None:
            parts = ("gate_proj", "up_proj") if m["part"] == "gate_up_proj" else (m["part"],)
            return all(self._expert_names(m["prefix"], p) or self._checkpoint_name(f"{m['prefix']}.{p}") for p in parts)
        return self._checkpoint_name(name) is not None

    def names(self) -> Iterator[str]:
        """The Transformers model's tensor names the files can give (per-expert tensors as fused names)."""
        for name in self._expected():
            if self._available(name):
                yield name

    def missing(self) -> list[str]:
        return [n for n in self._expected() if not self._available(n)]

    def get(self, name: str) -> QuantizedTensor:
        qt = self._get(name)
        expected = self._expected().get(name)
        if expected is not None and tuple(qt.shape) != tuple(expected):
            raise WeightError(f"{qt.source}: tensor {name!r} has shape {tuple(qt.shape)}, the model needs {tuple(expected)}")
        return QuantizedTensor(name, qt.ggml_type, qt.shape, qt.data, qt.source)

    def _get(self, name: str) -> QuantizedTensor:
        stored = self._checkpoint_name(name)
        if stored is not None:
            return self._raw(stored)
        m = _EXPERT_RE.match(name)
        if m:
            prefix, part = m["prefix"], m["part"]
            if part == "gate_up_proj":
                gate, up = self._get(f"{prefix}.gate_proj"), self._get(f"{prefix}.up_proj")
                return _stack(name, [gate, up], dim=1)
            names = self._expert_names(prefix, part)
            if names:
                return _stack(name, [self._raw(n) for n in names], dim=0)
        raise MissingTensorError(f"{self.path}: no tensor {name!r} in the safetensors files")

    def __repr__(self) -> str:
        return f"SafetensorsSource({self.path!r}, {len(self._entries)} tensors)"


def _stack(name: str, parts: list[QuantizedTensor], dim: int) -> QuantizedTensor:
    if any(p.ggml_type != parts[0].ggml_type for p in parts):
        raise WeightError(f"{parts[0].source}: parts of {name!r} have different dtypes")
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[parts[0].ggml_type]
    values = [p.data.view(dtype).reshape(p.shape) for p in parts]
    joined = torch.stack(values, dim=0) if dim == 0 else torch.cat(values, dim=dim)
    joined = joined.contiguous()
    return QuantizedTensor(name, parts[0].ggml_type, tuple(joined.shape), joined.view(torch.uint8).reshape(-1), parts[0].source)

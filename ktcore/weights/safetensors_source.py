"""``SafetensorsSource``: a Hugging Face model directory (``config.json`` + ``*.safetensors``).

Each file's header is parsed here and tensors are handed out as views on a memory map of the file (no
copy), as F32/F16/BF16 ``QuantizedTensor``. Per-expert checkpoint tensors
(``...experts.<e>.gate_proj.weight``) are stacked into the fused experts names of Transformers 5.
Native FP8 checkpoints (``F8_E4M3`` weights with ``weight_scale_inv`` block scales, ``ktcore/weights/fp8.py``)
come as ``F8_E4M3`` tensors carrying their scales; a ``quantization_config`` ktcore cannot read is refused
when the directory is opened. A sharded checkpoint's ``model.safetensors.index.json`` names the files read.
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

from . import fp8
from .source import MissingTensorError, WeightError
from .tensor import QuantizedTensor

_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F8_E4M3": fp8.FP8_TYPE}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, fp8.FP8_TYPE: torch.float8_e4m3fn}
INDEX = "model.safetensors.index.json"
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
        self.quantization = fp8.quantization_config(self.model_path)  # refuses what ktcore cannot read
        self._index: dict[str, str] | None = None
        files = self._index_files() if p.is_dir() else [p]
        if files is None:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise WeightError(f"{self.dir}: no .safetensors file")
        self._entries: dict[str, _Entry] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            self._read_header(f)
        if self._index is not None:
            for name, file in self._index.items():
                if name not in self._entries or self._entries[name].file.name != file:
                    raise WeightError(f"{self.dir / INDEX}: tensor {name!r} should be in {file}, which does not hold it")
        self._config = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    @staticmethod
    def can_open(path: str | os.PathLike) -> bool:
        p = Path(path)
        if p.is_dir():
            return any(p.glob("*.safetensors"))
        return p.suffix == ".safetensors"

    def _index_files(self) -> list[Path] | None:
        """The shards ``model.safetensors.index.json`` names (``None`` without an index)."""
        path = self.dir / INDEX
        if not path.is_file():
            return None
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise WeightError(f"{path}: not a safetensors index (needs a 'weight_map' object): {e}") from e
        self._index = weight_map
        files = []
        for name, file in weight_map.items():
            if not (self.dir / file).is_file():
                raise WeightError(f"{path}: shard {file} (holding {name!r}) is missing from {self.dir}")
            if self.dir / file not in files:
                files.append(self.dir / file)
        return sorted(files)

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
        data = self._bytes(e)
        if e.dtype != "F8_E4M3":
            return QuantizedTensor(name, _DTYPES[e.dtype], e.shape, data, str(e.file))
        scale_name = name + fp8.SCALE_SUFFIX
        s = self._entries.get(scale_name)
        if s is None:
            raise WeightError(f"{e.file}: FP8 tensor {name!r} has no block scales {scale_name!r} in {self.path}")
        if s.dtype not in ("F32", "BF16", "F16"):
            raise WeightError(f"{s.file}: block scales {scale_name!r} have dtype {s.dtype}; expected F32")
        scale = self._bytes(s).view(_TORCH[s.dtype]).reshape(s.shape)
        return fp8.block_scaled(name, data, e.shape, scale, str(e.file))

    def _bytes(self, e: _Entry) -> torch.Tensor:
        mm = self._maps.get(e.file)
        if mm is None:
            mm = self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="c")
        return torch.from_numpy(mm[e.start : e.end])

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
        return QuantizedTensor(name, qt.ggml_type, qt.shape, qt.data, qt.source, qt.scale)

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
    """Per-expert tensors stacked (``dim=0``) or gate and up joined (``dim=1``); FP8 scales follow their bytes,
    except where joined rows would split a 128-row block (then the values are joined dequantized, F32)."""
    kind = parts[0].ggml_type
    if any(p.ggml_type != kind for p in parts):
        raise WeightError(f"{parts[0].source}: parts of {name!r} have different dtypes")
    if kind == fp8.FP8_TYPE and dim == 1 and any(p.shape[-2] % fp8.BLOCK for p in parts[:-1]):
        parts = [QuantizedTensor(p.name, "F32", p.shape, p.dequantize().reshape(-1).view(torch.uint8), p.source) for p in parts]
        kind = "F32"
    values = [p.data.view(_TORCH[kind]).reshape(p.shape) for p in parts]
    joined = (torch.stack(values, dim=0) if dim == 0 else torch.cat(values, dim=dim)).contiguous()
    scale = None
    if kind == fp8.FP8_TYPE:
        scales = [p.scale for p in parts]
        scale = (torch.stack(scales, dim=0) if dim == 0 else torch.cat(scales, dim=dim)).contiguous()
    return QuantizedTensor(name, kind, tuple(joined.shape), joined.view(torch.uint8).reshape(-1), parts[0].source, scale)

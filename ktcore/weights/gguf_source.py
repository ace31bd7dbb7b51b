"""``GGUFSource``: a GGUF file, a split set (``-00001-of-0000N.gguf``) or a directory holding one.

Files are memory-mapped and their headers read lazily (``gguf_header.py``: the vocabulary is decoded
only when the tokenizer is built); ``get()`` hands out views on the mapping (only the q/k
row permutation of llama-arch files, fused gate+up concatenation and Gemma's norm offset copy data, and
the latter two are small or cannot be avoided). Names are those of the Transformers model the file's
metadata describes (see ``names.py``).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..readahead import read_ahead
from .gguf_header import GGUF_MAGIC, GGUFHeader
from .names import MODEL_TYPE_TO_ARCH, TensorRef, build_name_map, qk_row_permutation, qkvz_row_permutation
from .quants import GGML_TYPES_BY_ID
from .source import MissingTensorError, WeightError
from .tensor import QuantizedTensor

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def resolve_gguf_files(path: str | os.PathLike) -> list[Path]:
    """The GGUF file(s) of one model at ``path``: the file, every shard of its split set, or the one
    model found in a directory. Raises ``WeightError`` naming what is wrong."""
    p = Path(path)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix == ".gguf" and f.is_file())
        if not found:
            raise WeightError(f"{p}: no .gguf file in this directory")
        firsts = [f for f in found if not _SPLIT_RE.match(f.name) or _SPLIT_RE.match(f.name)["i"] == "00001"]
        if len(firsts) != 1:
            raise WeightError(f"{p}: holds several GGUF models ({', '.join(f.name for f in firsts)}); name one file")
        p = firsts[0]
    if not p.is_file():
        raise WeightError(f"{p}: no such GGUF file")
    m = _SPLIT_RE.match(p.name)
    if not m:
        return [p]
    n = int(m["n"])
    shards = [p.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise WeightError(f"{p}: split GGUF set is incomplete, missing {', '.join(missing)}")
    return shards


def is_gguf_file(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class _RawTensor:
    """One GGUF tensor: where it is and what it holds."""

    __slots__ = ("name", "type_name", "shape", "data", "file")

    def __init__(self, name: str, type_name: str, shape: tuple[int, ...], data: np.ndarray, file: Path):
        self.name, self.type_name, self.shape, self.data, self.file = name, type_name, shape, data, file

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class GGUFSource:
    """Transformers-named tensors of a GGUF model, kept quantized."""

    format = "gguf"

    def __init__(self, path: str | os.PathLike, model_path: str | os.PathLike | None = None):
        self.files = resolve_gguf_files(path)
        self.path = str(self.files[0])
        self.model_path = str(model_path) if model_path is not None else None
        self._readers = [GGUFHeader(f) for f in self.files]
        self._tensors: dict[str, _RawTensor] = {}
        for f, reader in zip(self.files, self._readers):
            for t in reader.tensors.values():
                self._tensors[t.name] = _RawTensor(t.name, GGML_TYPES_BY_ID[t.type_id].name, t.shape, t.data, f)
        from .gguf_config import read_metadata

        self.metadata = read_metadata(self._readers[0])
        read_ahead(self.files)
        self._config = None
        self._refs: dict[str, TensorRef] | None = None

    # --- file level -------------------------------------------------------------------------------

    @staticmethod
    def can_open(path: str | os.PathLike) -> bool:
        p = Path(path)
        if p.is_dir():
            return any(f.suffix == ".gguf" for f in p.iterdir())
        return p.suffix == ".gguf" or is_gguf_file(p)

    def gguf_names(self) -> list[str]:
        return list(self._tensors)

    def gguf_tensor(self, gguf_name: str) -> QuantizedTensor:
        """A tensor under its GGUF name, as stored (no permutation, no renaming)."""
        raw = self._tensors.get(gguf_name)
        if raw is None:
            raise MissingTensorError(f"{self.path}: no tensor {gguf_name!r} in the GGUF file")
        if raw.type_name not in _known_types():
            raise WeightError(f"{raw.file}: tensor {gguf_name!r} has unsupported GGML {raw.type_name}")
        data = torch.from_numpy(raw.data.reshape(-1).view(np.uint8))
        return QuantizedTensor(gguf_name, raw.type_name, raw.shape, data, str(raw.file))

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "?")

    # --- config / tokenizer -----------------------------------------------------------------------

    def config(self):
        if self._config is None:
            if self.model_path is not None:
                from transformers import AutoConfig

                self._config = AutoConfig.from_pretrained(self.model_path)
            else:
                from .gguf_config import config_from_metadata

                self._config = config_from_metadata(self.metadata, self._tensors.keys(), self.path)
        return self._config

    def chat_template(self) -> str | None:
        """The chat template the tokenizer will have, read without building it (GGUF metadata)."""
        if self.model_path is not None:
            return self.tokenizer().chat_template
        return self.metadata.get("tokenizer.chat_template")

    def tokenizer(self):
        if self.model_path is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.model_path)
        from .gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.path, self.config().model_type, reader=self._readers[0])

    # --- Transformers names -----------------------------------------------------------------------

    def _name_refs(self) -> dict[str, TensorRef]:
        if self._refs is None:
            config = self.config()
            arch = MODEL_TYPE_TO_ARCH.get(config.model_type)
            if arch is None or arch != self.architecture:
                raise WeightError(
                    f"{self.path}: GGUF architecture {self.architecture!r} does not match the config's "
                    f"model_type {config.model_type!r}"
                )
            self._refs = build_name_map(arch, config, expected_shapes(config))
        return self._refs

    def _resolve(self, ref: TensorRef) -> TensorRef | None:
        for candidate in (ref, *ref.alternatives):
            if all(g in self._tensors for g in candidate.gguf):
                return candidate
        return None

    def names(self) -> Iterator[str]:
        for name, ref in self._name_refs().items():
            if self._resolve(ref) is not None:
                yield name

    def missing(self) -> list[str]:
        """Transformers names the model has but the file lacks."""
        return [n for n, ref in self._name_refs().items() if self._resolve(ref) is None]

    def nbytes(self, name: str) -> int:
        ref = self._resolve(self._ref(name))
        return sum(self._tensors[g].nbytes for g in ref.gguf) if ref else 0

    def _ref(self, name: str) -> TensorRef:
        ref = self._name_refs().get(name)
        if ref is None:
            raise MissingTensorError(f"{self.path}: the {self.config().model_type} model has no tensor {name!r}")
        return ref

    def get(self, name: str) -> QuantizedTensor:
        ref = self._ref(name)
        found = self._resolve(ref)
        if found is None:
            raise MissingTensorError(
                f"{self.path}: tensor {name!r} (GGUF {' + '.join(ref.gguf)}) is missing from the file"
            )
        parts = [self.gguf_tensor(g) for g in found.gguf]
        if found.kind == "concat":
            qt = _concat_dim1(name, parts, ref.shape)
        elif found.kind == "kv_b":
            qt = self._kv_b(name, parts, ref.shape)
        elif found.kind == "qkvz":
            qt = self._qkvz(name, parts, ref.shape)
        elif found.kind in _INTERLEAVED_LAYOUTS:
            values = _INTERLEAVED_LAYOUTS[found.kind]([p.dequantize(torch.float32) for p in parts])
            if tuple(values.shape) != tuple(ref.shape):
                raise WeightError(f"{parts[0].source}: {name!r} from {[p.name for p in parts]} has shape "
                                  f"{tuple(values.shape)}, needs {tuple(ref.shape)}")
            qt = _f32_tensor(name, values, parts[0].source)
        else:
            qt = parts[0]
            if qt.shape != ref.shape:
                if int(np.prod(qt.shape)) == int(np.prod(ref.shape)) and _squeezed(qt.shape) == _squeezed(ref.shape):
                    qt = QuantizedTensor(qt.name, qt.ggml_type, ref.shape, qt.data, qt.source)  # [H] vs [1, H]
                else:
                    raise WeightError(
                        f"{qt.source}: tensor {found.gguf[0]!r} has shape {qt.shape}, the model's {name!r} needs {ref.shape}"
                    )
        qt = self._transform(name, qt, found.transform)
        return QuantizedTensor(name, qt.ggml_type, qt.shape, qt.data, qt.source)

    def _transform(self, name: str, qt: QuantizedTensor, transform: str) -> QuantizedTensor:
        if transform in ("permute_q", "permute_k"):
            config = self.config()
            heads = config.num_attention_heads if transform == "permute_q" else config.num_key_value_heads
            rows = qt.shape[0]
            # quantized rows are whole runs of blocks: permute them as bytes (numpy: a gather this small on
            # torch's intra-op threads costs more in thread wake-ups than in copying, 10-20 ms on a busy machine)
            raw = qt.data.numpy().reshape(rows, -1)
            perm = np.asarray(qk_row_permutation(rows, heads))
            return QuantizedTensor(name, qt.ggml_type, qt.shape, torch.from_numpy(raw[perm].reshape(-1)), qt.source)
        if transform == "minus_one":
            values = qt.dequantize(torch.float32) - 1.0
            return _f32_tensor(name, values, qt.source)
        if transform == "log_neg":  # Qwen3-Next's A_log, stored as -exp(A_log)
            return _f32_tensor(name, torch.log(-qt.dequantize(torch.float32)), qt.source)
        return qt

    def _qkvz(self, name: str, parts: list[QuantizedTensor], shape) -> QuantizedTensor:
        """Qwen3-Next's ``in_proj_qkvz`` from ``attn_qkv`` + ``attn_gate``: a row permutation, of whole rows of
        blocks (kept quantized) when both share a type."""
        qkv, gate = parts
        perm = torch.tensor(qkvz_row_permutation(self.config()))
        rows = qkv.shape[0] + gate.shape[0]
        if (rows, *qkv.shape[1:]) != tuple(shape):
            raise WeightError(f"{qkv.source}: {name!r} from {qkv.name!r} + {gate.name!r} has {rows} rows, needs {tuple(shape)}")
        if qkv.ggml_type == gate.ggml_type:
            raw = torch.cat([qkv.data.reshape(qkv.shape[0], -1), gate.data.reshape(gate.shape[0], -1)])
            return QuantizedTensor(name, qkv.ggml_type, tuple(shape), raw[perm].reshape(-1), qkv.source)
        values = torch.cat([qkv.dequantize(torch.float32), gate.dequantize(torch.float32)])
        return _f32_tensor(name, values[perm], qkv.source)

    def _kv_b(self, name: str, parts: list[QuantizedTensor], shape) -> QuantizedTensor:
        # llama.cpp split kv_b_proj [H*(nope+v), rank] into k_b [H, rank, nope] (transposed) and v_b [H, v, rank]
        k_b, v_b = (p.dequantize(torch.float32) for p in parts)
        if k_b.dim() == 2 or v_b.dim() == 2:
            heads = self.config().num_attention_heads
            k_b = k_b.reshape(heads, -1, k_b.shape[-1])
            v_b = v_b.reshape(heads, -1, v_b.shape[-1])
        kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, v_b.shape[-1])
        if tuple(kv_b.shape) != tuple(shape):
            raise WeightError(f"{parts[0].source}: {name!r} rebuilt from attn_k_b/attn_v_b has shape {tuple(kv_b.shape)}, needs {shape}")
        return _f32_tensor(name, kv_b.contiguous(), parts[0].source)

    def items(self, progress: bool | None = None) -> Iterator[tuple[str, QuantizedTensor]]:
        """Every (name, tensor), with a progress bar (tensor names and bytes) when ``progress``."""
        from .progress import LoadProgress

        names = list(self.names())
        with LoadProgress(sum(self.nbytes(n) for n in names), enabled=progress) as bar:
            for n in names:
                qt = self.get(n)
                yield n, qt
                bar.advance(n, self.nbytes(n))

    def release(self, name: str | None = None) -> None:
        """Drop mapped pages from this process's resident memory: those of Transformers tensor ``name``, or
        of every file. Views stay valid (pages are read back from the file when touched again); call it
        after an op has copied or repacked what it keeps, so the file is not resident twice."""
        if name is None:
            spans = [(r, 0, r.data.nbytes) for r in self._readers]
        else:
            ref = self._resolve(self._ref(name))
            spans = []
            for g in ref.gguf if ref else ():
                raw = self._tensors[g]
                reader = self._readers[self.files.index(raw.file)]
                start = raw.data.ctypes.data - reader.data.ctypes.data
                spans.append((reader, start, raw.nbytes))
        for reader, start, length in spans:
            _drop_pages(reader.data, start, length)

    def __repr__(self) -> str:
        return f"GGUFSource({self.path!r}, {len(self.files)} file(s), {len(self._tensors)} tensors)"


def _drop_pages(mapped: np.ndarray, start: int, length: int) -> None:
    """madvise(DONTNEED) over the whole pages inside [start, start + length) of a numpy memmap."""
    import mmap

    mm = getattr(mapped, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or length <= 0:
        return
    page = mmap.PAGESIZE
    # the numpy array may start inside the mmap (offset of the memmap); convert to mmap offsets
    base = getattr(mapped, "offset", 0) - (getattr(mapped, "offset", 0) // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
    first = -(-(base + start) // page) * page
    last = ((base + start + length) // page) * page
    if last > first:
        try:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError):
            pass


def _known_types() -> set[str]:
    from .quants import GGML_TYPES

    return set(GGML_TYPES)


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _f32_tensor(name: str, values: torch.Tensor, source: str) -> QuantizedTensor:
    values = values.to(torch.float32).contiguous()
    return QuantizedTensor(name, "F32", tuple(values.shape), values.view(torch.uint8).reshape(-1), source)


def _interleave_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b], dim=-1).flatten(-2)


# GPT-OSS's and Llama 4's experts in Transformers' layout, from llama.cpp's [E, out, in] tensors (values, so F32: a
# transpose or an interleave of quantized rows is not a whole-block operation). Experts ops read the
# split names, which stay quantized.
_INTERLEAVED_LAYOUTS = {
    "interleave_t": lambda parts: _interleave_last(parts[0].transpose(1, 2), parts[1].transpose(1, 2)),
    "interleave": lambda parts: _interleave_last(parts[0], parts[1]),
    "transpose": lambda parts: parts[0].transpose(1, 2).contiguous(),
    "concat_t": lambda parts: torch.cat(parts, dim=1).transpose(1, 2).contiguous(),  # Llama 4
}


def _concat_dim1(name: str, parts: list[QuantizedTensor], shape) -> QuantizedTensor:
    """[E, I, H] + [E, I, H] -> [E, 2I, H], kept quantized when both parts share a type (rows are whole
    blocks, so this is a byte concatenation per expert)."""
    first = parts[0]
    if any(p.shape[0] != first.shape[0] or p.shape[2:] != first.shape[2:] for p in parts):
        raise WeightError(f"{first.source}: cannot join {[p.name for p in parts]} into {name!r}: shapes {[p.shape for p in parts]}")
    out_shape = (first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:])
    if out_shape != tuple(shape):
        raise WeightError(f"{first.source}: {name!r} from {[p.name for p in parts]} has shape {out_shape}, needs {tuple(shape)}")
    if all(p.ggml_type == first.ggml_type for p in parts):
        experts = first.shape[0]
        data = torch.cat([p.data.reshape(experts, -1) for p in parts], dim=1).reshape(-1)
        return QuantizedTensor(name, first.ggml_type, out_shape, data, first.source)
    values = torch.cat([p.dequantize(torch.float32) for p in parts], dim=1)
    return _f32_tensor(name, values, first.source)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of the model ``config`` describes (built on meta)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}

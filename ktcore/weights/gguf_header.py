"""One GGUF file's header, read lazily: metadata values and the tensor table, over a memory map.

``gguf.GGUFReader`` builds a numpy record for every element of every metadata array, so opening a file
costs seconds per 100k vocabulary entries (15 s for Gemma 3's 262k). Here a string array is only walked
past (its lengths read, not its text) and kept as a ``LazyArray`` that ``read()`` decodes when the
tokenizer is built; numeric arrays are views on the mapping. Nothing else reads the file until a tensor's
pages are touched.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType

from .quants import GGML_TYPES_BY_ID
from .source import WeightError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent

_SCALARS = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class LazyArray:
    """A metadata array of strings, left in the file: ``count`` items from byte ``start``."""

    data: np.ndarray
    start: int
    count: int

    def read(self) -> list[str]:
        out, pos, buf = [], self.start, self.data
        for _ in range(self.count):
            (n,) = struct.unpack_from("<Q", buf, pos)
            out.append(bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"))
            pos += 8 + n
        return out

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type_id: int
    shape: tuple[int, ...]  # torch order (GGUF stores the fastest dimension first)
    data: np.ndarray  # uint8 view on the mapping


class GGUFHeader:
    """``fields``: key -> value (int/float/bool/str, a list for short numeric arrays, a numpy view for long
    ones, a ``LazyArray`` for string arrays); ``spans``: key -> ``(start, end)``, the bytes of the key and its
    value in the file; ``tensors``: name -> ``TensorEntry``; ``data``: the whole file as a copy-on-write
    ``np.memmap`` (writable views for torch, nothing ever reaches the file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 24:
            raise WeightError(f"{self.path}: too short to be a GGUF file ({size} bytes)")
        self.data = np.memmap(self.path, mode="c", dtype=np.uint8)
        magic = bytes(self.data[:4])
        if magic != GGUF_MAGIC:
            raise WeightError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self._parse()
        except (_Truncated, struct.error, UnicodeDecodeError, ValueError) as e:
            raise WeightError(f"{self.path}: unreadable GGUF header (truncated or corrupt?): {e}") from None

    # --- parsing ----------------------------------------------------------------------------------

    def _parse(self) -> None:
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.data, 4)
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are){hint}")
        self._pos = 24
        self.fields: dict = {}
        self.spans: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = self._pos
            key = self._string()
            self.fields[key] = self._value(self._u32())
            self.spans[key] = (start, self._pos)
        entries = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._u32()
            dims = struct.unpack_from(f"<{n_dims}Q", self.data, self._pos)
            self._pos += 8 * n_dims
            type_id, offset = struct.unpack_from("<IQ", self.data, self._pos)
            self._pos += 12
            entries.append((name, type_id, tuple(int(d) for d in reversed(dims)), offset))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, TensorEntry] = {}
        for name, type_id, shape, offset in entries:
            info = GGML_TYPES_BY_ID.get(type_id)
            if info is None:
                raise WeightError(f"{self.path}: tensor {name!r} has GGML type {type_id}, which gguf does not know")
            n_elements = int(np.prod(shape)) if shape else 1
            nbytes = info.nbytes(n_elements)
            begin = start + offset
            if begin + nbytes > len(self.data):
                raise WeightError(
                    f"{self.path}: tensor {name!r} ({info.name} {shape}) needs {nbytes} bytes at offset {begin} but "
                    f"the file ends at {len(self.data)} (truncated file?)"
                )
            self.tensors[name] = TensorEntry(name, type_id, shape, self.data[begin : begin + nbytes])
        del self._pos

    def _need(self, n: int) -> None:
        if self._pos + n > len(self.data):
            raise _Truncated(f"the header runs past the end of the file at byte {self._pos}")

    def _u32(self) -> int:
        self._need(4)
        (v,) = struct.unpack_from("<I", self.data, self._pos)
        self._pos += 4
        return v

    def _string(self) -> str:
        self._need(8)
        (n,) = struct.unpack_from("<Q", self.data, self._pos)
        self._need(8 + n)
        s = bytes(self.data[self._pos + 8 : self._pos + 8 + n]).decode("utf-8")
        self._pos += 8 + n
        return s

    def _value(self, vtype: int):
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype in _SCALARS:
            dtype = np.dtype(_SCALARS[vtype])
            self._need(dtype.itemsize)
            value = np.frombuffer(self.data, dtype, 1, self._pos)[0]
            self._pos += dtype.itemsize
            if vtype == GGUFValueType.FLOAT32:
                return float(str(value))  # 1e-05, not 9.999999747378752e-06
            return bool(value) if vtype == GGUFValueType.BOOL else value.item()
        # an array: item type, count, items
        item_type = GGUFValueType(self._u32())
        self._need(8)
        (count,) = struct.unpack_from("<Q", self.data, self._pos)
        self._pos += 8
        if item_type == GGUFValueType.STRING:
            start, buf = self._pos, self.data
            pos = start
            for _ in range(count):  # only the lengths: the text is decoded when someone asks
                if pos + 8 > len(buf):
                    raise _Truncated(f"a string array runs past the end of the file at byte {pos}")
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            self._pos = pos
            return LazyArray(self.data, start, count)
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type])
            self._need(dtype.itemsize * count)
            values = np.frombuffer(self.data, dtype, count, self._pos)
            self._pos += dtype.itemsize * count
            if item_type == GGUFValueType.BOOL:
                values = values.astype(bool)
            return values.tolist() if count <= 1024 else values
        return [self._value(item_type) for _ in range(count)]  # arrays of arrays

    # --- values -----------------------------------------------------------------------------------

    def raw(self, key: str) -> bytes:
        """The bytes of ``key``'s entry (key, type and value) as the file holds them."""
        start, end = self.spans[key]
        return bytes(self.data[start:end])

    def value(self, key: str, default=None):
        """The value of ``key`` in full (string arrays decoded, numpy arrays as lists)."""
        v = self.fields.get(key, default)
        if isinstance(v, LazyArray):
            return v.read()
        if isinstance(v, np.ndarray):
            return v.tolist()
        return v

"""A GGUF header reader: the key/value metadata and the tensor shapes, read with plain struct unpacking.

gguf-py's GGUFReader memory-maps every tensor through numpy, which took 1.7 s on a 98 MB model and grows with
the tensor count; the store needs only the header (GGUF spec: magic, version, tensor count, KV count, KVs,
tensor infos), which this reads in milliseconds. Large arrays (the vocabulary) are skipped, not kept.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_ITEMS = 64  # arrays longer than this (vocabularies, merges) are skipped
# Arrays of arrays: llama.cpp writes none deeper than 2 (and reads none deeper); a header nesting them 5,000 deep
# is a hostile file, refused here before reading it could recurse that far.
MAX_ARRAY_DEPTH = 8


class GGUFError(ValueError):
    pass


@dataclasses.dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensor_shapes: list[tuple[int, ...]]

    @property
    def parameter_count(self) -> int:
        total = 0
        for shape in self.tensor_shapes:
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError("not a GGUF file: it ends inside its header (truncated?)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > 1 << 30:
            raise GGUFError(f"implausible string length {length} in the GGUF header")
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"the GGUF header nests arrays deeper than {MAX_ARRAY_DEPTH} levels (corrupt or "
                                "hostile file?)")
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if count > _KEEP_ARRAY_ITEMS:
                self.skip(item_kind, count, depth + 1)
                return None
            return [self.value(item_kind, depth + 1) for _ in range(count)]
        raise GGUFError(f"unknown GGUF value type {kind}")

    def skip(self, kind: int, count: int, depth: int) -> None:
        if kind in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[kind]) * count, 1)
        elif kind == _STRING:
            for _ in range(count):
                self.f.seek(self.unpack("<Q"), 1)
        elif kind == _ARRAY:
            for _ in range(count):
                self.value(kind, depth)
        else:
            raise GGUFError(f"unknown GGUF value type {kind}")


def read_header(path: Path) -> GGUFHeader:
    with path.open("rb") as f:
        reader = _Reader(f)
        if reader.take(4) != MAGIC:
            raise GGUFError("not a GGUF file (it does not start with the GGUF magic bytes)")
        version = reader.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"not a GGUF file this reads: version {version} (a big-endian file?)")
        n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise GGUFError("implausible GGUF header counts (corrupt file?)")
        metadata = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        shapes = []
        for _ in range(n_tensors):
            reader.string()  # name
            n_dims = reader.unpack("<I")
            if n_dims > 8:
                raise GGUFError(f"implausible tensor rank {n_dims} in the GGUF header")
            shapes.append(tuple(reader.unpack("<Q") for _ in range(n_dims)))
            reader.take(12)  # type (u32) + data offset (u64)
        return GGUFHeader(version, metadata, shapes)

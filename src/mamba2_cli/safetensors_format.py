"""The safetensors container of state files (statefile.py), read by hand.

Weight files go through the safetensors package (checkpoint.py). A state file's checks need
what safe_open does not give: the offset of the tensor bytes (read by offset, CRC-32 per
block) and, for a truncated file, how many bytes its header promises.

Layout: 8 bytes little-endian header length n, n bytes of JSON ({name: {dtype, shape,
data_offsets}, "__metadata__": {...}}), then the tensor bytes, offsets counted from there.
"""

from __future__ import annotations

import json
import math

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
# The largest header read, the safetensors package's own limit: a hostile length field
# cannot make a reader allocate the whole file.
MAX_HEADER_BYTES = 100_000_000


class HeaderError(ValueError):
    """Not a safetensors header. `kind`: "length" (no header fits the file), "json"
    (unreadable), "object" (JSON, but not an object), "entry" (a malformed tensor entry)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def read_header(f, size: int) -> tuple[dict, int]:
    """(header object, offset of the tensor bytes) of an open file of `size` bytes."""
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n <= 1 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise HeaderError("length")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HeaderError("json") from None
    if not isinstance(header, dict):
        raise HeaderError("object")
    return header, 8 + n


def entry(info) -> tuple[torch.dtype, list[int], int, int, int]:
    """(dtype, shape, begin, end, bytes the shape needs) of one tensor entry."""
    try:
        dtype = DTYPES[info["dtype"]]
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise HeaderError("entry") from None
    return dtype, shape, begin, end, math.prod(shape) * dtype.itemsize

"""Validate a safetensors file's header against its size before anything is loaded from it.

A downloaded ``adapter_model.safetensors`` is untrusted. The format is an 8-byte little-endian header length, a JSON
header mapping tensor names to ``{dtype, shape, data_offsets}``, then the raw data. Checking that the header is
well-formed and that every tensor's bytes lie inside the file (and exactly fill it) turns a truncated or corrupt file
into a ``ValueError`` that says what is wrong, before safetensors or torch allocate anything.
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["MAX_HEADER_BYTES", "check_safetensors_file"]

#: safetensors' own limit on the JSON header (100 MB).
MAX_HEADER_BYTES = 100_000_000

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


def check_safetensors_file(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, dict]:
    """Return the tensor entries of the header of ``path``; ValueError if the file is truncated or corrupt.

    ``max_header_bytes``: refuse a longer header before parsing it. A caller that knows which tensors the file must
    hold passes a bound from them, so a small file listing a million empty tensors cannot cost gigabytes of parsed
    JSON before it is refused.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)

    def fail(reason: str) -> ValueError:
        return ValueError(
            f"{path} is not a valid safetensors file ({reason}); the adapter file is corrupt or truncated."
        )

    if size < 8:
        raise fail(f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        limit = min(max_header_bytes, MAX_HEADER_BYTES)
        if header_len > limit:
            raise fail(
                f"header length {header_len} exceeds the {limit}-byte limit"
                + (" for the tensors this adapter holds" if limit < MAX_HEADER_BYTES else "")
            )
        if header_len > size - 8:
            raise fail(f"header length {header_len} but only {size - 8} bytes follow")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"header is not JSON: {error}") from None
    except RecursionError:
        raise fail("header JSON nests too deeply") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    data_bytes = size - 8 - header_len
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end_max = 0
    for name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise fail(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise fail(f"tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if offsets[1] > data_bytes:
            raise fail(f"tensor {name!r} ends at byte {offsets[1]} of the data but the file holds {data_bytes}")
        expected = math.prod(shape) * _DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise fail(
                f"tensor {name!r} of shape {shape} and dtype {dtype} needs {expected} bytes but spans "
                f"{offsets[1] - offsets[0]}"
            )
        end_max = max(end_max, offsets[1])
    if end_max != data_bytes:
        raise fail(f"the tensors cover {end_max} bytes of data but the file holds {data_bytes}")
    return tensors

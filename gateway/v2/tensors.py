"""Open Inference Protocol tensors: datatypes, and BYTES elements as the binary extension
lays them out (each a 4-byte little-endian length, then the bytes). Pure numpy, shared by
the REST and gRPC fronts; nothing here imports grpc or tritonclient.
"""
from __future__ import annotations

import struct

import numpy as np

from gateway.errors import BadRequest

# V2 datatype -> numpy dtype (little-endian, as the protocol's binary data is)
DTYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.items()}
V2_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def datatype_of(dtype: str | np.dtype) -> str:
    """numpy dtype -> V2 datatype (the gateway's models declare float32 and the like)."""
    return V2_NAMES[np.dtype(dtype).newbyteorder("<")]


def element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(shape, where: str) -> list[int]:
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise BadRequest(f"{where}: shape must be a list of non-negative integers, got {shape!r}",
                         code="invalid_shape")
    return shape


def from_buffer(data: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray | list[bytes]:
    """A tensor's raw bytes (binary extension, gRPC raw contents) -> numpy, or BYTES elements."""
    count = element_count(shape)
    if datatype == "BYTES":
        elements = split_bytes(data, where)
        if len(elements) != count:
            raise BadRequest(f"{where}: shape {shape} holds {count} elements, the data {len(elements)}",
                             code="invalid_data")
        return elements
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise BadRequest(f"{where}: unknown datatype {datatype!r} (one of {', '.join([*DTYPES, 'BYTES'])})",
                         code="invalid_datatype")
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"{where}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
                         f"got {len(data)}", code="invalid_data")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def from_list(data, datatype: str, shape: list[int], where: str) -> np.ndarray | list[bytes]:
    """A tensor's JSON ``data`` (flat or nested, row-major) -> numpy, or BYTES elements."""
    count = element_count(shape)
    if datatype == "BYTES":
        flat = list(_flatten(data, where))
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"{where}: BYTES data must be strings", code="invalid_data")
        if len(flat) != count:
            raise BadRequest(f"{where}: shape {shape} holds {count} elements, the data {len(flat)}",
                             code="invalid_data")
        return [x.encode() for x in flat]
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise BadRequest(f"{where}: unknown datatype {datatype!r} (one of {', '.join([*DTYPES, 'BYTES'])})",
                         code="invalid_datatype")
    try:
        array = np.asarray(data, dtype=np.float64 if dtype.kind == "f" else None)
    except (ValueError, TypeError):
        raise BadRequest(f"{where}: data must be a (nested) list of numbers", code="invalid_data") from None
    kinds, what = {"b": ("b", "booleans"), "f": ("biuf", "numbers")}.get(dtype.kind, ("bui", "integers"))
    if array.dtype.kind not in kinds:
        raise BadRequest(f"{where}: data of {datatype} must hold {what}, got {array.dtype.name} values",
                         code="invalid_data")
    if array.size != count:
        raise BadRequest(f"{where}: shape {shape} holds {count} elements, the data {array.size}", code="invalid_data")
    return array.astype(dtype).reshape(shape)


def _flatten(data, where: str):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item, where)
    else:
        yield data


def split_bytes(data: bytes, where: str) -> list[bytes]:
    """BYTES elements from their serialized form (length-prefixed, little-endian)."""
    elements, offset, view = [], 0, memoryview(data)
    while offset < len(data):
        if offset + 4 > len(data):
            raise BadRequest(f"{where}: BYTES data ends inside an element's length", code="invalid_data")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(data):
            raise BadRequest(f"{where}: a BYTES element claims {length} bytes, {len(data) - offset} are left",
                             code="invalid_data")
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements in their serialized form."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)

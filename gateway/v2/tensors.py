"""Open Inference Protocol tensors: datatypes, shapes, and a tensor's data from the forms the
transports carry (raw bytes; JSON lists; BYTES elements laid out as the binary extension does:
each a 4-byte little-endian length, then the bytes). Pure numpy, shared by the REST and gRPC
fronts; nothing here imports grpc or tritonclient. Every refusal is a 400 naming ``where``.
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
MAX_DIMS = 8  # more than any image model's tensor has
MAX_DIM = 2**31 - 1
JSON_KINDS = {"b": ("b", "booleans"), "f": ("biuf", "numbers")}  # numpy kinds a datatype's JSON may hold


def datatype_of(dtype: str | np.dtype) -> str:
    """numpy dtype -> V2 datatype (the gateway's models declare float32 and the like)."""
    return V2_NAMES[np.dtype(dtype).newbyteorder("<")]


def numpy_dtype(datatype: str, where: str) -> np.dtype:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise BadRequest(f"{where}: unknown datatype {datatype!r} (one of {', '.join([*DTYPES, 'BYTES'])})",
                         code="invalid_datatype") from None


def element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_shape(shape, where: str) -> list[int]:
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIM for d in shape)):
        raise BadRequest(f"{where}: shape must be a list of at most {MAX_DIMS} integers within 0..{MAX_DIM}, "
                         f"got {shape!r}", code="invalid_shape")
    return shape


def _count_mismatch(shape: list[int], count: int, where: str) -> BadRequest:
    return BadRequest(f"{where}: shape {shape} holds {element_count(shape)} elements, the data {count}",
                      code="invalid_data")


def from_buffer(data: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray | list[bytes]:
    """A tensor's raw bytes (binary extension, gRPC raw contents) -> numpy, or BYTES elements."""
    if datatype == "BYTES":
        return split_bytes(data, element_count(shape), shape, where)
    dtype = numpy_dtype(datatype, where)
    needed = element_count(shape) * dtype.itemsize
    if len(data) != needed:
        raise BadRequest(f"{where}: shape {shape} of {datatype} needs {needed} bytes, got {len(data)}",
                         code="invalid_data")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def from_elements(elements: list[bytes], shape: list[int], where: str) -> list[bytes]:
    """BYTES elements given one by one (JSON strings, gRPC bytes_contents), counted against the shape."""
    if len(elements) != element_count(shape):
        raise _count_mismatch(shape, len(elements), where)
    return elements


def from_list(data, datatype: str, shape: list[int], where: str) -> np.ndarray | list[bytes]:
    """A tensor's JSON ``data`` (flat or nested, row-major) -> numpy, or BYTES elements."""
    if datatype == "BYTES":
        flat = _flatten(data, max(len(shape), 1), where)
        if not all(isinstance(x, str) for x in flat):
            raise BadRequest(f"{where}: BYTES data must be strings", code="invalid_data")
        return from_elements([x.encode() for x in flat], shape, where)
    dtype = numpy_dtype(datatype, where)
    kinds, what = JSON_KINDS.get(dtype.kind, ("bui", "integers"))
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise BadRequest(f"{where}: data must be a (nested) list of {what}", code="invalid_data") from None
    if array.dtype.kind not in kinds:
        raise BadRequest(f"{where}: data of {datatype} must hold {what}, got {array.dtype.name} values",
                         code="invalid_data")
    if array.size != element_count(shape):
        raise _count_mismatch(shape, array.size, where)
    if dtype.kind in "ui" and array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise BadRequest(f"{where}: data outside {datatype}'s range", code="invalid_data")
    return array.astype(dtype).reshape(shape)


def _flatten(data, depth: int, where: str) -> list:
    """Nested lists -> their leaves in row-major order, refusing nesting deeper than the shape."""
    flat: list = []
    stack = [(data, 0)]
    while stack:
        item, level = stack.pop()
        if not isinstance(item, list):
            flat.append(item)
        elif level >= depth and item or level > depth:
            raise BadRequest(f"{where}: data is nested deeper than its {depth}-dimensional shape", code="invalid_data")
        else:
            stack.extend((x, level + 1) for x in reversed(item))
    return flat


def split_bytes(data: bytes, count: int, shape: list[int], where: str) -> list[bytes]:
    """BYTES elements from their serialized form (length-prefixed, little-endian); exactly ``count``."""
    elements: list[bytes] = []
    offset, view = 0, memoryview(data)
    while offset < len(data):
        if len(elements) == count:
            raise BadRequest(f"{where}: shape {shape} holds {count} elements, the data more", code="invalid_data")
        if offset + 4 > len(data):
            raise BadRequest(f"{where}: BYTES data ends inside an element's length", code="invalid_data")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(data):
            raise BadRequest(f"{where}: a BYTES element claims {length} bytes, {len(data) - offset} are left",
                             code="invalid_data")
        elements.append(bytes(view[offset:offset + length]))
        offset += length
    return from_elements(elements, shape, where)


def join_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements in their serialized form."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)

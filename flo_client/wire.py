"""Binary wire format for named tensors, shared by the server and devices.

Layout of one message (all integers little-endian):

    magic        4 bytes   b"FLOT"
    version      1 byte    1
    header_len   4 bytes   unsigned, length of the JSON header in bytes
    header       JSON      {"meta": {...}, "tensors": [{"name", "dtype", "shape"}, ...]},
                           followed by spaces up to the data's alignment
    data         raw bytes of each tensor in header order, C order, no padding

The decoder is strict: the total length must match the header exactly, the
JSON header may not contain NaN, Infinity, overflowing numbers or duplicate
keys, and only the dtypes in SUPPORTED_DTYPES are recognised. It never
unpickles anything.
"""

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAGIC = b"FLOT"
VERSION = 1
MEDIA_TYPE = "application/vnd.flo.tensors"
_PREFIX = struct.Struct("<4sBI")

# Dtypes a message may declare. Anything else is rejected at decode time;
# the server then checks each tensor against the model's own dtype.
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
# Encoders pad the header with spaces so that the tensor data starts at a
# multiple of this many bytes. Arrays read from a memory-mapped message, whose
# mapping starts on a page, are then aligned: numpy reduced unaligned float32
# rows about three times slower (numpy 2.4.6). Decoders accept any padding.
DATA_ALIGNMENT = 64
MAX_HEADER_BYTES = 1024 * 1024
MAX_TENSORS = 1024
MAX_DIMENSIONS = 8
MAX_NAME_LENGTH = 128
MAX_INTEGER_DIGITS = 40


class WireFormatError(ValueError):
    """A message does not follow the tensor wire format."""


def encode_tensors(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode named arrays and a JSON-safe metadata object into one message.

    Args:
        tensors: name -> array; each dtype must be one of SUPPORTED_DTYPES.
        meta: JSON-serialisable metadata (round, example count, metrics).

    Raises:
        WireFormatError: on an unsupported dtype, a non-finite metadata
            number or a header over MAX_HEADER_BYTES.
    """
    entries = []
    payloads = []
    for name, array in tensors.items():
        array = np.asarray(array)
        dtype_name = _dtype_name(array.dtype)
        if dtype_name is None:
            raise WireFormatError(f"Tensor {name!r} has dtype {array.dtype}; supported dtypes are {', '.join(SUPPORTED_DTYPES)}.")
        entries.append({"name": name, "dtype": dtype_name, "shape": list(array.shape)})
        payloads.append(np.ascontiguousarray(array, dtype=SUPPORTED_DTYPES[dtype_name]).tobytes())
    try:
        header = json.dumps({"meta": dict(meta or {}), "tensors": entries}, allow_nan=False, separators=(",", ":")).encode()
    except ValueError as error:
        raise WireFormatError(f"Metadata contains a non-finite number: {error}") from error
    if len(header) > MAX_HEADER_BYTES:
        raise WireFormatError(f"Header of {len(header)} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes; send fewer or shorter tensor names or metadata.")
    # JSON allows trailing spaces; they make the data start at a multiple of
    # DATA_ALIGNMENT, unless they would take the header past its limit.
    padding = -(_PREFIX.size + len(header)) % DATA_ALIGNMENT
    if len(header) + padding <= MAX_HEADER_BYTES:
        header += b" " * padding
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, *payloads])


def decode_tensors(message: bytes | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Decode a message into its metadata and read-only arrays.

    Returns:
        (meta, tensors) where tensors keeps the order of the header.

    Raises:
        WireFormatError: with a sentence saying what is malformed.
    """
    meta, layout = _decode_layout(message)
    tensors = {name: np.frombuffer(message, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape) for name, dtype, shape, offset in layout}
    return meta, tensors


def decode_flat(message: bytes | memoryview, *, tensors: Sequence[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> tuple[dict[str, Any], np.ndarray | None]:
    """Decode a message and return its tensor data as one flat read-only array, without a copy.

    The data of the tensors lie back to back in the message, so when the
    header lists exactly `tensors` (name and shape), in that order and all of
    `dtype`, the flat array is the concatenation of their C-order values.

    Returns:
        (meta, flat), where flat is None when the tensors differ from
        `tensors` in names, order, shapes or dtype.

    Raises:
        WireFormatError: as `decode_tensors`, for a malformed message.
    """
    meta, layout = _decode_layout(message)
    expected = [(name, tuple(shape)) for name, shape in tensors]
    if [(name, shape) for name, _, shape, _ in layout] != expected or any(entry_dtype != dtype for _, entry_dtype, _, _ in layout):
        return meta, None
    count = sum(math.prod(shape) for _, shape in expected)
    offset = layout[0][3] if layout else len(message)
    return meta, np.frombuffer(message, dtype=dtype, count=count, offset=offset)


def _decode_layout(message: bytes | memoryview) -> tuple[dict[str, Any], list[tuple[str, np.dtype, tuple[int, ...], int]]]:
    """Check a message and return its metadata and (name, dtype, shape, data offset) per tensor, in header order."""
    if len(message) < _PREFIX.size:
        raise WireFormatError(f"Message is {len(message)} bytes, shorter than the {_PREFIX.size}-byte prefix.")
    magic, version, header_length = _PREFIX.unpack_from(message)
    if magic != MAGIC:
        raise WireFormatError("Message does not start with the FLOT magic bytes; send the tensor wire format.")
    if version != VERSION:
        raise WireFormatError(f"Wire format version {version} is not supported; this server reads version {VERSION}.")
    if header_length > MAX_HEADER_BYTES:
        raise WireFormatError(f"Header of {header_length} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes.")
    header_end = _PREFIX.size + header_length
    if header_end > len(message):
        raise WireFormatError("Message ends inside its JSON header.")

    # bytes() also takes a memoryview of a mapped payload.
    header = parse_strict_json(bytes(message[_PREFIX.size : header_end]))
    meta, entries = _check_header(header)

    layout = []
    offset = header_end
    for name, dtype, shape in entries:
        size_bytes = math.prod(shape) * dtype.itemsize
        if offset + size_bytes > len(message):
            raise WireFormatError(f"Message ends inside the data of tensor {name!r}.")
        layout.append((name, dtype, shape, offset))
        offset += size_bytes
    if offset != len(message):
        raise WireFormatError(f"Message has {len(message) - offset} bytes after the last tensor.")
    return meta, layout


def parse_strict_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON, rejecting NaN, Infinity, overflowing numbers and duplicate keys.

    Python's json module accepts the tokens NaN and Infinity and turns 1e400
    into inf; neither is valid JSON nor a usable value here. Integers are
    limited to MAX_INTEGER_DIGITS digits.

    Raises:
        WireFormatError: naming the offending token.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WireFormatError(f"JSON is not valid UTF-8: {error}") from error
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_finite_float,
            parse_int=_parse_bounded_int,
            object_pairs_hook=_reject_duplicate_keys,
        )
    except json.JSONDecodeError as error:
        raise WireFormatError(f"JSON is malformed: {error}") from error


def _reject_constant(token: str) -> None:
    raise WireFormatError(f"JSON contains {token}, which is not a number; send finite values only.")


def _parse_finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise WireFormatError(f"JSON number {token} overflows a 64-bit float; send finite values only.")
    return value


def _parse_bounded_int(token: str) -> int:
    # Python refuses to parse integers of more than 4300 digits with a plain
    # ValueError; no field of ours needs more than 20.
    if len(token.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise WireFormatError(f"JSON integer of {len(token)} digits is too long; integers have at most {MAX_INTEGER_DIGITS} digits.")
    return int(token)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise WireFormatError(f"JSON object repeats the key {key!r}.")
        result[key] = value
    return result


def _check_header(header: Any) -> tuple[dict[str, Any], list[tuple[str, np.dtype, tuple[int, ...]]]]:
    if not isinstance(header, dict) or set(header) != {"meta", "tensors"}:
        raise WireFormatError('Header must be a JSON object with exactly the keys "meta" and "tensors".')
    meta, raw_entries = header["meta"], header["tensors"]
    if not isinstance(meta, dict):
        raise WireFormatError('Header field "meta" must be a JSON object.')
    if not isinstance(raw_entries, list) or len(raw_entries) > MAX_TENSORS:
        raise WireFormatError(f'Header field "tensors" must be a list of at most {MAX_TENSORS} entries.')

    entries = []
    seen_names = set()
    for entry in raw_entries:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise WireFormatError('Each tensor entry must have exactly the keys "name", "dtype" and "shape".')
        name, dtype_name, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
            raise WireFormatError(f"Tensor name {name!r} must be a string of 1 to {MAX_NAME_LENGTH} characters.")
        if name in seen_names:
            raise WireFormatError(f"Tensor {name!r} appears twice.")
        seen_names.add(name)
        if dtype_name not in SUPPORTED_DTYPES:
            raise WireFormatError(f"Tensor {name!r} has dtype {dtype_name!r}; supported dtypes are {', '.join(SUPPORTED_DTYPES)}.")
        is_valid_shape = (
            isinstance(shape, list)
            and len(shape) <= MAX_DIMENSIONS
            and all(isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**31 for size in shape)
        )
        if not is_valid_shape:
            raise WireFormatError(f"Tensor {name!r} has shape {shape!r}; a shape is a list of at most {MAX_DIMENSIONS} non-negative integers.")
        entries.append((name, SUPPORTED_DTYPES[dtype_name], tuple(shape)))
    return meta, entries


def _dtype_name(dtype: np.dtype) -> str | None:
    """Return the wire name of a dtype of either byte order, or None if unsupported."""
    for name, supported in SUPPORTED_DTYPES.items():
        if np.dtype(dtype).newbyteorder("<") == supported and dtype.kind == supported.kind:
            return name
    return None

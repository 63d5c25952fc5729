"""Tensor wire format: round trip and strict decoding (no database)."""

import json
import struct

import numpy as np
import pytest

from flo_client import wire


def encode(tensors, meta=None):
    return wire.encode_tensors(tensors, meta or {})


def test_round_trip_keeps_names_shapes_values_and_meta():
    tensors = {"weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.array([1.5], dtype=np.float32)}

    meta, decoded = wire.decode_tensors(encode(tensors, {"round": 3}))

    assert meta == {"round": 3}
    assert list(decoded) == ["weight", "bias"]
    np.testing.assert_array_equal(decoded["weight"], tensors["weight"])
    np.testing.assert_array_equal(decoded["bias"], tensors["bias"])


def test_decoded_arrays_are_read_only():
    _, decoded = wire.decode_tensors(encode({"w": np.zeros(2, dtype=np.float32)}))

    assert not decoded["w"].flags.writeable


def test_scalar_and_empty_tensors_round_trip():
    _, decoded = wire.decode_tensors(encode({"s": np.float32(2.0), "e": np.zeros((0, 3), dtype=np.float32)}))

    assert decoded["s"].shape == ()
    assert decoded["e"].shape == (0, 3)


def test_int64_dtype_is_kept():
    _, decoded = wire.decode_tensors(encode({"steps": np.array(7, dtype=np.int64)}))

    assert decoded["steps"].dtype == np.int64


def test_unsupported_dtype_is_rejected_when_encoding():
    with pytest.raises(wire.WireFormatError, match="dtype"):
        encode({"w": np.zeros(2, dtype=np.complex64)})


def build(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<4sBI", b"FLOT", 1, len(header)) + header + data


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"", "shorter"),
        (b"XXXX\x01\x00\x00\x00\x00", "magic"),
        (struct.pack("<4sBI", b"FLOT", 2, 2) + b"{}", "version"),
        (struct.pack("<4sBI", b"FLOT", 1, 100) + b"{}", "inside its JSON header"),
        (build(b"[]"), "exactly the keys"),
        (build(b'{"meta": {}, "tensors": [], "x": 1}'), "exactly the keys"),
        (build(b'{"meta": {"a": NaN}, "tensors": []}'), "NaN"),
        (build(b'{"meta": {"a": Infinity}, "tensors": []}'), "Infinity"),
        (build(b'{"meta": {"a": 1e400}, "tensors": []}'), "overflows"),
        (build(b'{"meta": {"a": 1, "a": 2}, "tensors": []}'), "repeats"),
        (build(b'{"meta": {}, "tensors": [{"name": "w", "dtype": "float16", "shape": [1]}]}', b"\x00\x00"), "dtype"),
        (build(b'{"meta": {}, "tensors": [{"name": "w", "dtype": "float32", "shape": [-1]}]}'), "shape"),
        (build(b'{"meta": {}, "tensors": [{"name": "w", "dtype": "float32", "shape": [true]}]}'), "shape"),
        (build(b'{"meta": {}, "tensors": [{"name": "w", "dtype": "float32", "shape": [2]}]}', b"\x00" * 4), "inside the data"),
        (build(b'{"meta": {}, "tensors": [{"name": "w", "dtype": "float32", "shape": [1]}]}', b"\x00" * 5), "after the last tensor"),
        (build(b'{"meta": {}, "tensors": [{"name": "w", "dtype": "float32", "shape": [1]}, {"name": "w", "dtype": "float32", "shape": [1]}]}', b"\x00" * 8), "twice"),
        (build(b"\xff\xfe"), "UTF-8"),
    ],
    ids=[
        "empty",
        "bad-magic",
        "bad-version",
        "truncated-header",
        "header-not-object",
        "extra-header-key",
        "nan-token",
        "infinity-token",
        "overflowing-number",
        "duplicate-key",
        "unsupported-dtype",
        "negative-dimension",
        "boolean-dimension",
        "truncated-data",
        "trailing-bytes",
        "duplicate-tensor",
        "invalid-utf8",
    ],
)
def test_malformed_message_is_rejected(message, match):
    with pytest.raises(wire.WireFormatError, match=match):
        wire.decode_tensors(message)


def test_non_finite_meta_is_rejected_when_encoding():
    with pytest.raises(wire.WireFormatError, match="non-finite"):
        encode({}, {"loss": float("nan")})


def test_overlong_integer_is_rejected():
    with pytest.raises(wire.WireFormatError, match="too long"):
        wire.decode_tensors(build(b'{"meta": {"a": 1' + b"0" * 5000 + b'}, "tensors": []}'))


FLAT_TENSORS = {"weight": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.array([1.5, -2.0], dtype=np.float32)}
FLAT_LAYOUT = [("weight", (2, 3)), ("bias", (2,))]


def test_decode_flat_concatenates_tensor_data_in_header_order():
    meta, flat = wire.decode_flat(encode(FLAT_TENSORS, {"round": 2}), tensors=FLAT_LAYOUT, dtype=np.dtype(np.float32))

    assert meta == {"round": 2}
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, 1.5, -2.0])


def test_decode_flat_result_is_read_only():
    _, flat = wire.decode_flat(encode(FLAT_TENSORS), tensors=FLAT_LAYOUT, dtype=np.dtype(np.float32))

    assert not flat.flags.writeable


@pytest.mark.parametrize(
    "layout",
    [
        [("bias", (2,)), ("weight", (2, 3))],
        [("weight", (3, 2)), ("bias", (2,))],
        [("weight", (2, 3))],
        [("weight", (2, 3)), ("bias", (2,)), ("extra", (1,))],
    ],
    ids=["other order", "other shape", "missing tensor", "extra tensor"],
)
def test_decode_flat_gives_none_for_another_layout(layout):
    _, flat = wire.decode_flat(encode(FLAT_TENSORS), tensors=layout, dtype=np.dtype(np.float32))

    assert flat is None


def test_decode_flat_gives_none_for_another_dtype():
    tensors = {"weight": FLAT_TENSORS["weight"].astype(np.float64), "bias": FLAT_TENSORS["bias"]}

    _, flat = wire.decode_flat(encode(tensors), tensors=FLAT_LAYOUT, dtype=np.dtype(np.float32))

    assert flat is None


def test_decode_flat_rejects_malformed_message():
    with pytest.raises(wire.WireFormatError, match="after the last tensor"):
        wire.decode_flat(encode(FLAT_TENSORS) + b"\0", tensors=FLAT_LAYOUT, dtype=np.dtype(np.float32))


@pytest.mark.parametrize("meta", [{}, {"round": 1}, {"round": 123456, "note": "x" * 37}])
def test_encoded_data_starts_at_alignment(meta):
    message = encode(FLAT_TENSORS, meta)

    (header_length,) = struct.unpack_from("<I", message, 5)
    assert (9 + header_length) % wire.DATA_ALIGNMENT == 0


def test_decoder_accepts_unpadded_header():
    header = json.dumps({"meta": {}, "tensors": [{"name": "w", "dtype": "float32", "shape": [2]}]}).encode()
    message = struct.pack("<4sBI", b"FLOT", 1, len(header)) + header + np.array([1.0, 2.0], dtype=np.float32).tobytes()

    _, tensors = wire.decode_tensors(message)

    np.testing.assert_array_equal(tensors["w"], [1.0, 2.0])


def test_header_near_limit_is_left_unpadded():
    empty = encode(FLAT_TENSORS, {"note": ""})
    (padded_length,) = struct.unpack_from("<I", empty, 5)
    unpadded_length = len(empty[9 : 9 + padded_length].rstrip(b" "))
    # A note that brings the header to 3 bytes under the limit, where padding to the alignment would pass it.
    message = encode(FLAT_TENSORS, {"note": "x" * (wire.MAX_HEADER_BYTES - 3 - unpadded_length)})

    (header_length,) = struct.unpack_from("<I", message, 5)
    _, tensors = wire.decode_tensors(message)

    assert header_length == wire.MAX_HEADER_BYTES - 3
    np.testing.assert_array_equal(tensors["bias"], FLAT_TENSORS["bias"])


def test_encoder_rejects_header_over_limit():
    with pytest.raises(wire.WireFormatError, match="exceeds the limit"):
        wire.encode_tensors(FLAT_TENSORS, {"note": "x" * wire.MAX_HEADER_BYTES})

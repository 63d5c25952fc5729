"""Stored payloads mapped into one address range, and the strided array of their rows that aggregation reads."""

import gc
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from federation.services import update_store
from federation.services.aggregation import _read_flat_update, _rows_as_array
from flo_client import wire

BASE_DIR = Path(__file__).resolve().parents[1]
LAYOUT = [("w", (3, 5)), ("b", (5,))]
SPECS = [SimpleNamespace(name=name, shape=shape) for name, shape in LAYOUT]


@pytest.fixture
def store(settings, tmp_path):
    settings.FLO_UPDATE_STORE_DIR = str(tmp_path)
    return tmp_path


def write(name: str, fill: float, *, meta: dict | None = None) -> int:
    """Store a payload of the LAYOUT tensors filled with `fill` and return its size."""
    body = wire.encode_tensors({"w": np.full((3, 5), fill, dtype=np.float32), "b": np.full(5, fill, dtype=np.float32)}, meta)
    update_store.write_payload(name, body)
    return len(body)


def read_rows(payloads: update_store.PayloadRange, count: int) -> list[np.ndarray]:
    updates = [SimpleNamespace(node_id=index) for index in range(count)]
    return [_read_flat_update(update, SPECS, LAYOUT, payloads.payload(index)) for index, update in enumerate(updates)]


def mapped_ranges() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split()[0] for line in maps}


def test_payload_views_equal_stored_bytes(store):
    sizes = [write(f"p{index}.flo", float(index)) for index in range(3)]

    payloads = update_store.PayloadRange([f"p{index}.flo" for index in range(3)], sizes)

    for index in range(3):
        assert bytes(payloads.payload(index)) == (store / f"p{index}.flo").read_bytes()


def test_rows_at_one_offset_form_one_array(store):
    sizes = [write(f"p{index}.flo", float(index), meta={"round": 1}) for index in range(4)]
    payloads = update_store.PayloadRange([f"p{index}.flo" for index in range(4)], sizes)
    rows = read_rows(payloads, 4)

    array = _rows_as_array(payloads, rows)

    np.testing.assert_array_equal(array, np.stack(rows))


def test_rows_at_different_offsets_stay_separate(store):
    # A longer meta pushes the second payload's data to a later 64-byte boundary.
    sizes = [write("short.flo", 1.0, meta={"round": 1}), write("long.flo", 2.0, meta={"round": 1, "note": "x" * 100})]
    payloads = update_store.PayloadRange(["short.flo", "long.flo"], sizes)
    rows = read_rows(payloads, 2)

    assert _rows_as_array(payloads, rows) is None


def test_unaligned_rows_stay_separate(store):
    # Strip the header's padding until the data starts one byte past a multiple of 4.
    body = wire.encode_tensors({"w": np.ones((3, 5), dtype=np.float32), "b": np.ones(5, dtype=np.float32)})
    prefix = struct.Struct("<4sBI")
    magic, version, header_length = prefix.unpack_from(body)
    header = body[prefix.size : prefix.size + header_length].rstrip(b" ")
    while (prefix.size + len(header)) % 4 != 1:
        header += b" "
    unaligned = prefix.pack(magic, version, len(header)) + header + body[prefix.size + header_length :]
    for name in ("p0.flo", "p1.flo"):
        update_store.write_payload(name, unaligned)
    payloads = update_store.PayloadRange(["p0.flo", "p1.flo"], [len(unaligned)] * 2)
    rows = read_rows(payloads, 2)

    assert _rows_as_array(payloads, rows) is None


def test_copied_row_keeps_rows_separate(store):
    sizes = [write(f"p{index}.flo", float(index)) for index in range(2)]
    payloads = update_store.PayloadRange(["p0.flo", "p1.flo"], sizes)
    rows = read_rows(payloads, 2)
    rows[1] = rows[1].copy()

    assert _rows_as_array(payloads, rows) is None


def test_rows_array_is_read_only(store):
    sizes = [write(f"p{index}.flo", float(index)) for index in range(2)]
    payloads = update_store.PayloadRange(["p0.flo", "p1.flo"], sizes)

    array = _rows_as_array(payloads, read_rows(payloads, 2))

    assert not array.flags.writeable


def test_range_stays_mapped_while_rows_are_referenced(store):
    sizes = [write(f"p{index}.flo", float(index)) for index in range(2)]
    payloads = update_store.PayloadRange(["p0.flo", "p1.flo"], sizes)
    array = _rows_as_array(payloads, read_rows(payloads, 2))
    start = f"{payloads.base:x}"
    del payloads
    gc.collect()

    assert any(entry.startswith(start) for entry in mapped_ranges())
    np.testing.assert_array_equal(array[1], np.ones(20, dtype=np.float32))


def test_range_is_unmapped_when_released(store):
    sizes = [write(f"p{index}.flo", float(index)) for index in range(2)]
    payloads = update_store.PayloadRange(["p0.flo", "p1.flo"], sizes)
    array = _rows_as_array(payloads, read_rows(payloads, 2))
    start = f"{payloads.base:x}"
    del payloads, array
    gc.collect()

    assert not any(entry.startswith(start) for entry in mapped_ranges())


@pytest.mark.parametrize(
    ("names", "recorded_extra_bytes"),
    [(["p0.flo", "gone.flo"], 0), (["p0.flo", "p0.flo"], 1), (["p0.flo", "empty.flo"], None)],
    ids=["missing", "resized", "empty"],
)
def test_range_rejects_bad_payload_and_unmaps(store, names, recorded_extra_bytes):
    size = write("p0.flo", 1.0)
    (store / "empty.flo").write_bytes(b"")
    before = mapped_ranges()
    recorded = [size, 0 if recorded_extra_bytes is None else size + recorded_extra_bytes]

    with pytest.raises(update_store.PayloadMissing):
        update_store.PayloadRange(names, recorded)

    gc.collect()
    assert mapped_ranges() <= before


def test_range_larger_than_address_space_rejected(store):
    write("p0.flo", 1.0)
    before = mapped_ranges()

    with pytest.raises(OSError, match="more address space"):
        update_store.PayloadRange(["p0.flo"] * 4, [2**62 + 1] * 4)

    assert mapped_ranges() <= before


def test_rows_array_cannot_be_made_writable(store):
    sizes = [write(f"p{index}.flo", float(index)) for index in range(2)]
    payloads = update_store.PayloadRange(["p0.flo", "p1.flo"], sizes)
    array = _rows_as_array(payloads, read_rows(payloads, 2))

    with pytest.raises(ValueError, match="WRITEABLE"):
        array.flags.writeable = True


def test_single_copied_row_stays_separate(store):
    payloads = update_store.PayloadRange(["p0.flo"], [write("p0.flo", 1.0)])

    assert _rows_as_array(payloads, [read_rows(payloads, 1)[0].copy()]) is None


def test_rows_longer_than_a_shorter_payload_rejected(store):
    sizes = [write("short.flo", 1.0), write("long.flo", 1.0, meta={"note": "x" * 100})]
    payloads = update_store.PayloadRange(["short.flo", "long.flo"], sizes)
    long_row = read_rows(payloads, 2)[1]
    offset = long_row.__array_interface__["data"][0] - payloads.base - payloads.stride

    with pytest.raises(ValueError, match="do not fit"):
        payloads.rows(offset, long_row.size, np.float32)


def test_process_with_reader_thread_exits_cleanly(store):
    # A daemon thread still reads the rows while the interpreter exits; the range must stay mapped until the process ends.
    sizes = [write(f"p{index}.flo", float(index)) for index in range(2)]
    script = f"""
import threading, django
django.setup()
from federation.services import update_store
payloads = update_store.PayloadRange(["p0.flo", "p1.flo"], {sizes})
rows = payloads.rows(0, 16, "uint8")
started = threading.Event()
def read():
    started.set()
    while True:
        rows.sum()
threading.Thread(target=read, daemon=True).start()
started.wait()
"""
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "flo_site.settings", "FLO_UPDATE_STORE_DIR": str(store)}

    finished = subprocess.run([sys.executable, "-c", script], env=environment, cwd=BASE_DIR, capture_output=True, timeout=60)

    assert finished.returncode == 0, finished.stderr.decode()


def test_rows_outside_payloads_rejected(store):
    size = write("p0.flo", 1.0)
    payloads = update_store.PayloadRange(["p0.flo"], [size])

    with pytest.raises(ValueError, match="do not fit"):
        payloads.rows(size - 4, 2, np.float32)

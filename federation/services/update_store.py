"""Update payloads as files: written once and durably on submission, memory-mapped for aggregation.

A payload lives at FLO_UPDATE_STORE_DIR/<federation>/<round>/<node>-<random>.flo
and its ModelUpdate row stores the relative name. Payloads stay out of the
database because a 400 KB bytea costs the server its escaping and the
database its compression attempt and write-ahead log on every submission,
and because aggregation reads memory-mapped files at page-cache speed.

Several servers and workers must see one directory (a shared volume). A
file is written to a temporary name, fsynced and renamed, so a reader sees
either no file or the whole payload, and one that a crash left behind is
never referenced by a committed row.
"""

import ctypes
import errno
import logging
import mmap
import os
import platform
import resource
import secrets
import sys
import time
import weakref
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from django.conf import settings

from federation.models import ModelUpdate

logger = logging.getLogger(__name__)

SUFFIX = ".flo"
TEMPORARY_SUFFIX = ".partial"
# Linux's mmap flag that maps every page of a mapping at once; 0 where the platform lacks it.
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# Descriptors left free for sockets, logs and the database when payloads are mapped.
DESCRIPTOR_RESERVE = 64
# Linux's mmap flag and protection that Python's mmap module does not export, from <asm-generic/mman-common.h>.
MAP_FIXED = 0x10
PROT_NONE = 0


class PayloadMissing(Exception):
    """Error for a stored payload file that is missing or whose size differs from its row's."""


def store_dir() -> Path:
    return Path(settings.FLO_UPDATE_STORE_DIR)


def new_payload_name(*, federation_id: int, round_number: int, node_id: str) -> str:
    """Return a fresh name, relative to the store, for a node's payload in a round.

    The random part keeps two racing submissions of one node from writing
    the same file, so the one whose row does not commit deletes only its own.
    """
    return f"{federation_id}/{round_number}/{node_id}-{secrets.token_hex(8)}{SUFFIX}"


def write_payload(name: str, body: bytes) -> None:
    """Write a payload under `name`, durably: the file appears, complete and fsynced, or not at all."""
    path = store_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(body)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        os.fsync(descriptor)
    except BaseException:
        os.close(descriptor)
        temporary.unlink(missing_ok=True)
        raise
    os.close(descriptor)
    os.replace(temporary, path)


def read_payload(name: str, *, expected_bytes: int, mapped: bool = True) -> mmap.mmap | bytes:
    """Map a stored payload read-only, or read it into memory. Arrays decoded from a mapping share its pages.

    Each mapping keeps a file descriptor open until it is released: Python's
    mmap holds a duplicate of the file's descriptor. Call
    `reserve_descriptors` before keeping many mappings at once, and read
    with mapped=False when it refuses.

    Raises:
        PayloadMissing: the file is absent or its size differs from `expected_bytes`.
        OSError: the file cannot be opened, mapped or read.
    """
    path = store_dir() / name
    try:
        with open(path, "rb") as file:
            _require_size(name, file.fileno(), expected_bytes)
            if not mapped:
                return file.read()
            # MAP_POPULATE maps every page in one call instead of one page fault per 4 KiB.
            return mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED | MAP_POPULATE, prot=mmap.PROT_READ)
    except FileNotFoundError:
        raise PayloadMissing(f"The stored payload {name} is missing from {store_dir()}.") from None


def reserve_descriptors(count: int) -> bool:
    """Make room for `count` more open file descriptors in this process, and return whether there is room.

    Raises the soft limit on open files (RLIMIT_NOFILE) up to the hard limit
    when the descriptors open now, `count` and DESCRIPTOR_RESERVE would pass
    it. Returns False when even the hard limit is too low, or where the
    open descriptors cannot be counted (no /proc/self/fd).
    """
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        return False
    needed = open_now + count + DESCRIPTOR_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return True
    if hard != resource.RLIM_INFINITY and needed > hard:
        logger.warning("too few file descriptors to map payloads needed=%d hard_limit=%d", needed, hard)
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))
    logger.info("raised the open file limit to map payloads needed=%d soft_limit_was=%d", needed, soft)
    return True


def delete_payload(name: str) -> None:
    """Delete a stored payload. A file that is already gone is not an error."""
    if not name:
        return
    try:
        (store_dir() / name).unlink()
    except FileNotFoundError:
        return
    except OSError as error:
        logger.error("payload file not deleted name=%s error=%s", name, error)


def delete_orphaned_payloads(*, older_than_seconds: float) -> int:
    """Delete payload files that no update row names and that are older than `older_than_seconds`.

    Orphans are files of submissions whose transaction never committed,
    left by a process that died between writing the file and committing the
    row. The age limit spares submissions still in progress.

    Returns:
        The number of files deleted.
    """
    root = store_dir()
    cutoff = time.time() - older_than_seconds
    deleted = 0
    for round_dir in sorted(root.glob("*/*")) if root.is_dir() else []:
        old_files = {}
        for path in round_dir.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    old_files[path.relative_to(root).as_posix()] = path
            except FileNotFoundError:
                continue
        if not old_files:
            continue
        referenced = set(ModelUpdate.objects.filter(payload_file__in=list(old_files)).values_list("payload_file", flat=True))
        for name, path in old_files.items():
            if name not in referenced:
                path.unlink(missing_ok=True)
                deleted += 1
    if deleted:
        logger.info("orphaned payload files deleted count=%d", deleted)
    return deleted


class PayloadRange:
    """Stored payloads mapped read-only into one reserved address range, payload i at i * `stride` bytes (Linux on x86-64 or ARM64).

    Where every payload's data starts at the same offset in its file, the
    payloads' rows form one (n, d) array with a row stride of whole pages
    (`rows`), which the array kernels read with BLAS. On the 100 payloads of
    bench/round.py, interleaved warm aggregation tasks took 10 to 13 % less
    time than with one mapping per file (BENCHMARKS.md, fifth machine).
    Python's mmap takes no address, so the range is reserved and each file
    mapped into it with MAP_FIXED through the C library. The descriptors
    are closed once the files are mapped. The range stays mapped while this
    object, a payload view or an array read from it is referenced, and
    until the process ends, so threads still reading at exit never read
    unmapped memory.

    NOTE: a MAP_FIXED call that fails after replacing part of the
    reservation, which older Linux kernels could do, leaves a hole that
    another thread's mapping may fill before the range is unmapped whole.

    Raises:
        PayloadMissing: a file is absent, empty or its size differs from its expected bytes.
        OSError: the platform is not supported (`available` is False), the
            range is larger than the address space, or a file cannot be
            opened or mapped.
    """

    def __init__(self, names: Sequence[str], expected_bytes: Sequence[int]) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "Mapping payloads into one address range needs Linux's C library on x86-64 or ARM64.")

        self.sizes = list(expected_bytes)
        self.stride = -(-max(self.sizes, default=1) // mmap.PAGESIZE) * mmap.PAGESIZE
        length = self.stride * max(len(self.sizes), 1)
        if length > sys.maxsize:
            raise OSError(errno.EOVERFLOW, f"{len(self.sizes)} payloads of up to {self.stride} bytes need more address space than there is.")

        base = libc.mmap(None, length, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base is None or base == _MAP_FAILED:
            error = ctypes.get_errno()
            raise OSError(error, f"Reserving {length} bytes of address space for {len(self.sizes)} payloads failed: {os.strerror(error)}.")
        try:
            buffer = (ctypes.c_ubyte * length).from_address(base)
        except BaseException:
            libc.munmap(base, length)
            raise

        # Every array and view over the range keeps `buffer` alive, and the range is unmapped once none does.
        unmap = weakref.finalize(buffer, libc.munmap, base, length)
        # Other threads may still read the range at exit, so it is never unmapped then.
        unmap.atexit = False

        try:
            for index, (name, size) in enumerate(zip(names, self.sizes, strict=True)):
                _map_fixed(libc, base + index * self.stride, name, size)
        except BaseException:
            unmap()
            raise

        self.base = base
        # A read-only memoryview, so numpy cannot make any view of the read-only pages writable.
        self._bytes = np.frombuffer(memoryview(buffer).toreadonly(), dtype=np.uint8)

    @staticmethod
    def available() -> bool:
        """Return whether this platform can map payloads into one range."""
        return _libc() is not None

    def payload(self, index: int) -> memoryview:
        """Return payload `index` as a read-only view of its mapped bytes."""
        start = index * self.stride
        return memoryview(self._bytes[start : start + self.sizes[index]])

    def rows(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        """Return the (n, count) read-only array whose row i contains `count` values of `dtype` from byte `offset` of payload i."""
        itemsize = np.dtype(dtype).itemsize
        if offset < 0 or offset % itemsize or any(offset + count * itemsize > size for size in self.sizes):
            raise ValueError(f"Rows of {count} values of {np.dtype(dtype)} from byte {offset} do not fit in every payload.")
        return np.ndarray((len(self.sizes), count), dtype=dtype, buffer=self._bytes, offset=offset, strides=(self.stride, itemsize))


_MAP_FAILED = ctypes.c_void_p(-1).value


@cache
def _libc() -> ctypes.CDLL | None:
    """Return the C library with mmap and munmap declared, or None where PayloadRange is not supported.

    MAP_FIXED has the value of <asm-generic/mman-common.h>, which x86-64 and
    ARM64 use, but not every Linux architecture.
    """
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _map_fixed(libc: ctypes.CDLL, address: int, name: str, expected_bytes: int) -> None:
    """Map the stored payload `name` read-only at `address`, which lies in a range reserved for it."""
    path = store_dir() / name
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise PayloadMissing(f"The stored payload {name} is missing from {store_dir()}.") from None
    try:
        size = _require_size(name, descriptor, expected_bytes)
        mapped = libc.mmap(address, size, mmap.PROT_READ, mmap.MAP_SHARED | MAP_FIXED | MAP_POPULATE, descriptor, 0)
        if mapped is None or mapped == _MAP_FAILED:
            error = ctypes.get_errno()
            raise OSError(error, f"Mapping the stored payload {name} failed: {os.strerror(error)}.")
        if mapped != address:
            libc.munmap(mapped, size)
            raise OSError(errno.EFAULT, f"Mapping the stored payload {name} returned another address than the one reserved for it.")
    finally:
        os.close(descriptor)


def _require_size(name: str, descriptor: int, expected_bytes: int) -> int:
    """Return the size of the open payload file `name`, raising PayloadMissing when it is empty or differs from `expected_bytes`."""
    size = os.fstat(descriptor).st_size
    if size != expected_bytes or size == 0:
        raise PayloadMissing(f"The stored payload {name} has {size} bytes, but its update recorded {expected_bytes}.")
    return size

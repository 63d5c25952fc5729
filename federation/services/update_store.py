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

import logging
import mmap
import os
import resource
import secrets
import time
from pathlib import Path

from django.conf import settings

from federation.models import ModelUpdate

logger = logging.getLogger(__name__)

SUFFIX = ".flo"
TEMPORARY_SUFFIX = ".partial"
# Linux's mmap flag that maps every page of a mapping at once; 0 where the platform lacks it.
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# Descriptors left free for sockets, logs and the database when payloads are mapped.
DESCRIPTOR_RESERVE = 64


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
            size = os.fstat(file.fileno()).st_size
            if size != expected_bytes or size == 0:
                raise PayloadMissing(f"The stored payload {name} has {size} bytes, but its update recorded {expected_bytes}.")
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

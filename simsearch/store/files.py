"""Files of the index directory: atomic replacement, careful reads, the writer lock."""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_module
from pathlib import Path

from ..errors import CorruptIndexError, IndexLockedError, IndexWriteError

DB_NAME, FAISS_NAME, SIDECAR_NAME, LOCK_NAME = "simsearch.db", "vectors.faiss", "vectors.json", "lock"


def read_regular(path: Path, *, exact_size: int | None = None, max_size: int | None = None) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a symlink, pipe or device) of the
    expected size, else None: a planted ``/dev/zero`` or a huge file is never read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat_module.S_ISREG(st.st_mode) or (exact_size is not None and st.st_size != exact_size) \
            or (max_size is not None and st.st_size > max_size):
        os.close(fd)
        return None
    with open(fd, "rb") as f:
        data = f.read(st.st_size + 1)
    return data if len(data) == st.st_size else None


def remove_stale_temp_files(directory: Path) -> None:
    """Temp files of writers that died mid-write (only the lock holder writes, so any found
    now are orphans)."""
    for name in (FAISS_NAME, SIDECAR_NAME):
        for tmp in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that it holds the old or the new bytes, never a mix:
    a temp file in the same directory, fsynced, renamed over ``path``, the directory fsynced.
    On failure the temp file is removed and ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    # O_EXCL | O_NOFOLLOW: never write through a planted symlink.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def acquire_lock(directory: Path) -> int:
    """Take the writer lock of ``directory`` (flock on ``lock``, holding our PID); returns its fd.

    Raises :class:`IndexLockedError` naming the holder's PID, :class:`CorruptIndexError` if
    the lock is a planted symlink, :class:`IndexWriteError` if the directory is not writable.
    """
    import fcntl

    lock_path = directory / LOCK_NAME
    try:
        # O_NOFOLLOW: a lock "file" that is a symlink must not make us truncate its target.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptIndexError(f"{lock_path} is a symbolic link; refusing to use it as the lock") from None
        raise IndexWriteError(f"cannot write to the index in {directory}: {e.strerror} "
                              "(is the directory read-only, or not yours?)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise IndexLockedError(f"index {directory} is locked by PID {pid} (another simsearch is writing to it)") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as e:
        os.close(fd)
        raise IndexWriteError(f"cannot write to the index in {directory}: {e.strerror}") from None
    return fd

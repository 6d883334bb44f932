"""Writing a checkpoint directory so that a crash never leaves a mix of old and new.

Everything new is written into a staging directory beside the target (`.NAME.retrofit-new`); unchanged files are
hard-linked into it, so staging costs only the bytes that change. When it is complete, a marker file is written into
it and synced, and it replaces the target:

- in place, with one atomic `renameat2(RENAME_EXCHANGE)` that swaps the two directories, so at every instant the
  target path holds either the whole old or the whole new checkpoint; the old one then sits at the staging name and
  is deleted. File systems without exchange (rare: some network file systems) get two renames instead, and a crash
  between them leaves the target missing until the next run finishes the switch.
- to a new directory, with one rename of the staging directory.

`recover_interrupted_switch` runs whenever a checkpoint is opened. It reads the state from what exists (is the
staging directory complete? does the target carry the marker, i.e. did the switch happen?) and finishes a complete
switch or rolls back an incomplete one. A lock on the parent directory keeps two rewrites, or a rewrite and a
recovery, apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError

log = logging.getLogger(__name__)

MARKER = ".retrofit-switch"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.retrofit-new"


def _old_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.retrofit-old"


def crash_test_point(name: str) -> None:
    """Test hook: with LLM_RETROFIT_PAUSE_AT=name, announce the point on stderr and wait to be killed there."""
    if os.environ.get("LLM_RETROFIT_PAUSE_AT") == name:
        print(f"llm-retrofit paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


@contextlib.contextmanager
def _parent_lock(target: Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on the target's parent directory; yields False if `wait` is off and it is taken."""
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (a directory's entries are what make renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    """Flush every file of a staged checkpoint to disk, so the switch never exposes half-written data."""
    for path in directory.iterdir():
        if path.is_file():
            _fsync(path)
    _fsync(directory)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories; False where the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None or os.environ.get("LLM_RETROFIT_NO_EXCHANGE"):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _switch(target: Path) -> None:
    """Put the complete staging directory at `target`, then delete the old checkpoint and the marker."""
    staging, old = staging_dir(target), _old_dir(target)
    if _exchange(staging, target):
        crash_test_point("switched")
        os.rename(staging, old)
    else:
        os.rename(target, old)
        crash_test_point("half-switched")
        os.rename(staging, target)
    _fsync(target.parent)
    crash_test_point("cleanup")
    shutil.rmtree(old)
    (target / MARKER).unlink()
    _fsync(target)


def recover_interrupted_switch(target: Path) -> None:
    """Finish or roll back an in-place rewrite of `target` that a crash interrupted; a no-op otherwise."""
    staging, old = staging_dir(target), _old_dir(target)
    if not (staging.exists() or old.exists() or (target / MARKER).exists()):
        return
    with _parent_lock(target, wait=False) as locked:
        if not locked:
            return  # a rewrite is running right now; it is not interrupted
        staged = (staging / MARKER).exists()
        if not target.exists():
            if staged or old.exists():  # the two-rename switch stopped between its renames
                log.warning("finishing the interrupted in-place rewrite of %s", target)
                os.rename(staging if staged else old, target)
            else:  # a write to a new directory that crashed; there is nothing to keep
                shutil.rmtree(staging)
        elif staged:
            log.warning("finishing the interrupted in-place rewrite of %s", target)
            _switch(target)
            return
        elif staging.exists():
            # Either a rewrite that never completed, or, if the target carries the marker, the old checkpoint
            # that an exchange already swapped out. Both go.
            log.warning("cleaning up an interrupted in-place rewrite of %s", target)
            shutil.rmtree(staging)
        if old.exists():
            shutil.rmtree(old)
        if (target / MARKER).exists():
            (target / MARKER).unlink()


@contextlib.contextmanager
def staged_directory(target: Path, *, in_place: bool) -> Iterator[Path]:
    """Yield an empty directory to write the new checkpoint into; on success it becomes `target`, atomically.

    On any failure (or Ctrl-C) the staging directory is removed and `target` is as it was.
    """
    target = target.resolve()
    if in_place:
        recover_interrupted_switch(target)
    elif target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OutputError(f"{target} already exists and is not empty; choose another output directory or remove it.")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent} does not exist; create it first or choose another output directory.")
    with _parent_lock(target, wait=False) as locked:
        if not locked:
            raise OutputError(
                f"another llm-retrofit rewrite is running in {target.parent}; wait for it to finish and try again."
            )
        staging = staging_dir(target)
        if staging.exists():  # left by a crashed write to a new directory, which has nothing to recover
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            yield staging
            if in_place:
                _sync_tree(staging)
                crash_test_point("staged")
                (staging / MARKER).touch()
                _fsync(staging)
                _switch(target)
            else:
                os.rename(staging, target)
        except BaseException:
            if not (staging / MARKER).exists():  # a complete staging directory is the next run's to finish
                shutil.rmtree(staging, ignore_errors=True)
            raise


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link an unchanged file (free on the same file system), else copy it.

    A symlink is followed first: a Hub snapshot's files are relative links into the cache's blobs, and a link to
    the link itself would dangle in the new directory.
    """
    source = source.resolve()
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)

"""Writing a checkpoint directory so that a crash never leaves a mix of old and new.

Everything new is written into a staging directory beside the target (`.NAME.retrofit-new`); unchanged files are
hard-linked into it, so staging costs only the bytes that change. When it is complete, a marker file is written into
it and synced, and it replaces the target:

- in place, with one atomic `renameat2(RENAME_EXCHANGE)` that swaps the two directories, so at every instant the
  target path holds either the whole old or the whole new checkpoint; the old one then sits at the staging name and
  is deleted. File systems without exchange (rare: some network file systems) get two renames instead, and a crash
  between them leaves the target missing until the next run finishes the switch.
- to a new directory, with one rename of the staging directory.

In place, nothing of the target that the new checkpoint does not replace is lost (a git clone's `.git/`, an
`original/` folder, files we know nothing of): before the marker, every such file is hard-linked into the staging
directory, keeping its inode and so its mode and bytes; every such directory is moved into it at the switch, just
before the exchange. The moves happen only once the marker says the new checkpoint is complete, and
`_switch`, which does them, is also what recovery runs for a complete staging directory, so a crash between two
moves is finished by the next run rather than leaving a folder behind in the old checkpoint, which is deleted. The
staging directory takes the target's mode, and each new file the mode of the file it replaces.

`recover_interrupted_switch` runs whenever a checkpoint is opened. It reads the state from what exists (is the
staging directory complete? does the target carry the marker, i.e. did the switch happen?) and finishes a complete
switch or rolls back an incomplete one. A lock file beside the target, named after it, keeps two rewrites of the same
target, or a rewrite and a recovery of it, apart; rewrites of different directories in one parent do not wait for
each other.

While a rewrite runs, SIGTERM (what `kill`, Slurm and `docker stop` send) is handled like Ctrl-C: the staging
directory is removed and the error says so. Once the marker is written, the switch is finished first (a few renames)
and the termination reported after it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from ..errors import WRITE_ERRNOS, OutputError, output_error

log = logging.getLogger(__name__)

MARKER = ".retrofit-switch"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.retrofit-new"


def _old_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.retrofit-old"


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.retrofit-lock"


def crash_test_point(name: str) -> None:
    """Test hook: with LLM_RETROFIT_PAUSE_AT=name, announce the point on stderr and wait there to be killed.

    The wait also ends once the file named by LLM_RETROFIT_RESUME_WHEN exists (two runs at once), or when a SIGTERM
    arrives whose handling is deferred (see `_committing`), so a test can see what follows.
    """
    if os.environ.get("LLM_RETROFIT_PAUSE_AT") == name:
        print(f"llm-retrofit paused at {name}", file=sys.stderr, flush=True)
        resume = os.environ.get("LLM_RETROFIT_RESUME_WHEN")
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline and not _sigterm.received and not (resume and os.path.exists(resume)):
            time.sleep(0.05)


# ------------------------------------------------------------------------------------------------------ the lock


def _acquire_lock(target: Path) -> int | None:
    """Take the exclusive lock of `target` without waiting: its file descriptor, or None if another process holds it.

    The lock is `.NAME.retrofit-lock` beside the target, so it covers what is written and nothing else. The file
    exists only while held (`_release_lock` deletes it before unlocking). Whoever opened it just before that deletion
    then holds a lock on a file no longer reachable by its name, which guards nothing, so the name is checked to still
    lead to the locked file, and the lock taken again if not. A holder killed with SIGKILL leaves the file behind but
    not the lock (the kernel drops it), so the next run takes it. Raises OSError where the file cannot be created.
    """
    path = _lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            named, held = os.stat(path), os.fstat(fd)
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release_lock(target: Path, fd: int) -> None:
    try:
        _lock_path(target).unlink(missing_ok=True)  # while still held: see _acquire_lock
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------- SIGTERM


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a rewrite. A KeyboardInterrupt, like Ctrl-C's, so that no `except Exception` in the code it
    interrupts can swallow it, and the cleanup Ctrl-C gets runs; `staged_directory` turns it into an OutputError."""

    def __init__(self, committed: bool = False):
        super().__init__("SIGTERM")
        self.committed = committed


class _SigtermState:
    """Whether a SIGTERM arrived, and whether raising it must wait for the end of a switch (`_committing`)."""

    def __init__(self) -> None:
        self.received = False
        self.raised = False
        self.deferred = 0

    def handle(self, _signum: int, _frame: object) -> None:
        if self.received:
            return  # a second SIGTERM must not interrupt the cleanup the first one started
        self.received = True
        if not self.deferred:
            self.raised = True
            raise _Terminated()


_sigterm = _SigtermState()


@contextlib.contextmanager
def _sigterm_like_sigint() -> Iterator[None]:
    """Handle SIGTERM like Ctrl-C for the duration, where nobody else handles it.

    Only where its handler is the default one (which kills the process without any cleanup) and in the main thread
    (the only one Python delivers signals to): a program that installed its own handler, or a rewrite nested in
    another, keeps the handling it has.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    _sigterm.received = _sigterm.raised = False
    previous = signal.signal(signal.SIGTERM, _sigterm.handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm.received = _sigterm.raised = False


@contextlib.contextmanager
def _committing() -> Iterator[None]:
    """Defer SIGTERM until the block is done: a switch interrupted halfway is safe, but a finished one is better."""
    _sigterm.deferred += 1
    try:
        yield
    finally:
        _sigterm.deferred -= 1
    if _sigterm.received and not _sigterm.raised and not _sigterm.deferred:
        _sigterm.raised = True
        raise _Terminated(committed=True)


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
        if path.is_file() and not path.is_symlink():  # a link's target is not ours to open (it may be unreadable)
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


def _carry_directories(target: Path, staging: Path) -> None:
    """Move every directory of `target` the staging directory lacks into it (see the module docstring)."""
    present = set(os.listdir(staging))
    moved = False
    for entry in sorted(target.iterdir()):
        if entry.name not in present and entry.is_dir() and not entry.is_symlink():
            os.rename(entry, staging / entry.name)
            moved = True
            crash_test_point("carried")
    if moved:
        _fsync(target)
        _fsync(staging)


def _switch(target: Path) -> None:
    """Put the complete staging directory at `target`, then delete the old checkpoint and the marker."""
    staging, old = staging_dir(target), _old_dir(target)
    _carry_directories(target, staging)
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
    target = Path(target).expanduser().resolve()
    staging, old = staging_dir(target), _old_dir(target)
    if not (staging.exists() or old.exists() or (target / MARKER).exists() or _lock_path(target).exists()):
        return
    try:
        fd = _acquire_lock(target)
    except OSError as e:  # a read-only place: nothing here can be repaired, and the target is read as it is
        log.warning("cannot check %s for an interrupted rewrite (%s); reading it as it is", target, e.strerror)
        return
    if fd is None:
        return  # a rewrite is running right now; it is not interrupted
    try:
        _recover(target)
    finally:
        _release_lock(target, fd)


def _recover(target: Path) -> None:
    """`recover_interrupted_switch`, with the lock held."""
    staging, old = staging_dir(target), _old_dir(target)
    staged = (staging / MARKER).exists()
    if not target.exists():
        if staged or old.exists():  # the two-rename switch stopped between its renames
            log.warning("finishing the interrupted in-place rewrite of %s", target)
            os.rename(staging if staged else old, target)
        elif staging.exists():  # a write to a new directory that crashed; there is nothing to keep
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
def staged_directory(target: Path, *, in_place: bool, replaces: Collection[str] = ()) -> Iterator[Path]:
    """Yield an empty directory to write the new checkpoint into; on success it becomes `target`, atomically.

    In place, `replaces` names the entries of the target that the new checkpoint supersedes (its old weight files,
    index and config); everything else in the target is carried over as it is (see the module docstring), except
    where the new checkpoint writes a file of the same name. New files get the mode of the file they replace, or,
    for a name the target did not have (a new shard), of the first of `replaces` that exists.

    On any failure, Ctrl-C or SIGTERM the staging directory is removed and `target` is as it was. A write that fails
    for want of space or permission is raised as one OutputError naming `target`, for API users as for the CLI.
    """
    target = Path(target).expanduser().resolve()
    with _sigterm_like_sigint():
        try:
            with _locked_staging(target, in_place, replaces) as staging:
                yield staging
        except _Terminated as e:
            if e.committed:
                raise OutputError(f"stopped by SIGTERM just after {target} was completely written; it is usable as "
                                  "it is, but whatever was to follow did not run: run it again if needed.") from None
            if in_place:
                raise OutputError(f"stopped by SIGTERM before the in-place rewrite of {target} was complete; it is "
                                  "as it was: run the command again to redo it.") from None
            raise OutputError(f"stopped by SIGTERM before {target} was complete; nothing was left there: run the "
                              "command again to redo it.") from None
        except OSError as e:  # a full or read-only disk is the machine's fault: say so for the output asked for
            if e.errno not in WRITE_ERRNOS:
                raise
            raise output_error(target, e) from None


@contextlib.contextmanager
def _locked_staging(target: Path, in_place: bool, replaces: Collection[str]) -> Iterator[Path]:
    """`staged_directory` without the SIGTERM handling: lock, recover, stage, carry over, commit."""
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent} does not exist; create it first or choose another output directory.")
    try:
        fd = _acquire_lock(target)
    except OSError as e:
        raise OutputError(f"cannot write in {target.parent} ({e.strerror}); choose an output directory you can "
                          "write to.") from None
    if fd is None:
        raise OutputError(f"another llm-retrofit rewrite of {target} is running; wait for it to finish and try again.")
    try:
        _recover(target)  # under the lock, so no other run can leave something between the recovery and our start
        if not in_place and target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise OutputError(f"{target} already exists and is not empty; choose another output directory or "
                              "remove it.")
        staging = staging_dir(target)
        staging.mkdir()
        if in_place:
            # Never readable by more people than the target: a 700 checkpoint stays private while it is staged.
            # The owner's bits are added because the staging directory must be written; they are a directory's usual.
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode) | stat.S_IRWXU)
        try:
            yield staging
            if in_place:
                written = set(os.listdir(staging))
                _match_modes(target, staging, written, replaces)
                _carry_files(target, staging, written | set(replaces))
                _sync_tree(staging)
                crash_test_point("staged")
                with _committing():
                    (staging / MARKER).touch()
                    _fsync(staging)
                    _switch(target)
            else:
                with _committing():
                    os.rename(staging, target)
        except BaseException:
            if not (staging / MARKER).exists():  # a complete staging directory is the next run's to finish
                shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        _release_lock(target, fd)


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # a Hub snapshot's files are links: the blob's mode is the one
    except FileNotFoundError:
        return None


def _match_modes(target: Path, staging: Path, written: set[str], replaces: Collection[str]) -> None:
    """Give each file the new checkpoint wrote the mode of the one it replaces (600 stays 600, not the umask's 644)."""
    fallback = next((mode for mode in map(_mode, (target / name for name in replaces)) if mode is not None), None)
    for name in written:
        path = staging / name
        info = path.lstat()
        # A file with other links is shared with another directory: its mode is not this checkpoint's to change.
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            mode = _mode(target / name)
            mode = fallback if mode is None else mode
            if mode is not None:
                os.chmod(path, mode)


def _carry_files(target: Path, staging: Path, skip: set[str]) -> None:
    """Link every entry of `target` but its directories and `skip` into the staging directory, unchanged.

    A hard link is the same file under a second name, so bytes, mode and times are kept and nothing is copied; a
    symlink is linked as the link (a Hub snapshot's relative links resolve the same from the sibling staging
    directory). Directories are moved at the switch instead (`_carry_directories`), and they must be on the
    target's file system for that, which is checked here, before anything is committed.
    """
    device = target.stat().st_dev
    for entry in sorted(target.iterdir()):
        if entry.name in skip or entry.name == MARKER:
            continue
        info = entry.lstat()
        if stat.S_ISDIR(info.st_mode):
            if info.st_dev != device:
                raise OutputError(f"{entry} is a mount point, which an in-place rewrite cannot carry over; unmount "
                                  "it, or write the new checkpoint to another directory with -o.")
            continue
        destination = staging / entry.name
        try:
            os.link(entry, destination, follow_symlinks=False)
        except OSError:  # no hard links on this file system, or not allowed for this file
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(entry), destination)
            elif stat.S_ISREG(info.st_mode):
                shutil.copy2(entry, destination)
            else:
                raise OutputError(f"{entry} is neither a file nor a directory and cannot be linked here; move it out "
                                  f"of {target}, or write the new checkpoint to another directory with -o.") from None


def replace_file(path: Path, content: bytes | str, *, follow_symlinks: bool = False) -> None:
    """Write `content` to `path` as a new file renamed over the old one, never into the old one.

    Files of a written checkpoint may be hard links shared with its source (`link_or_copy`), or symlinks into a Hub
    cache: writing into one would change the source, or the cache, too. A rename replaces only this name. Readers see
    the old or the new content, never half of it. The new file keeps the mode of the one it replaces (a new name
    gets the mode `open()` would give it). With `follow_symlinks` (a path the user named), a symlink is kept and the
    file it leads to replaced. A device or pipe (`--json /dev/stdout`) is simply written to: it is no file to share.
    """
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    if path.exists() and not path.is_file():
        with open(path, "wb") as f:
            f.write(data)
        return
    with staged_file(path.resolve() if follow_symlinks else path, handle_sigterm=False) as temporary:
        temporary.write_bytes(data)


@contextlib.contextmanager
def staged_file(path: Path, *, handle_sigterm: bool = True) -> Iterator[Path]:
    """Yield a new, empty file beside `path` to write; on success it is synced and renamed over `path`.

    `replace_file`'s rule for one file written at length (a GGUF export): the old file at `path`, if any, keeps its
    bytes and inode until the rename, and lends the new file its mode. On any failure, Ctrl-C or (with
    `handle_sigterm`) SIGTERM the partial file is removed; a write that fails for want of space or permission is
    raised as one OutputError naming `path`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent} does not exist; create it first or choose another output path.")
    mode = _mode(path)
    temporary = path.with_name(f".{path.name}.retrofit-tmp-{secrets.token_hex(4)}")
    with _sigterm_like_sigint() if handle_sigterm else contextlib.nullcontext():
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # less the umask
            os.close(fd)
            if mode is not None:
                os.chmod(temporary, mode)
            yield temporary
            _fsync(temporary)
            os.replace(temporary, path)
        except _Terminated:
            temporary.unlink(missing_ok=True)
            raise OutputError(f"stopped by SIGTERM before {path} was complete; nothing was left there: run the "
                              "command again to redo it.") from None
        except OSError as e:
            temporary.unlink(missing_ok=True)
            if e.errno not in WRITE_ERRNOS:
                raise
            raise output_error(path, e) from None
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def linked_copy(source: Path, target: Path) -> Path:
    """A new directory `target` with a hard link to each top-level, non-hidden file of `source` (a copy where a link is
    impossible): a model directory that can be written to (with `replace_file`) without touching `source`, for the
    cost of its directory entries. Like `apply_to_checkpoint` to a new directory, it leaves hidden entries and
    subdirectories behind. Returns the resolved `target`."""
    source = Path(source)
    with staged_directory(target, in_place=False) as staging:
        for entry in sorted(source.iterdir()):
            if not entry.name.startswith(".") and entry.is_file():
                link_or_copy(entry, staging / entry.name)
    return Path(target).expanduser().resolve()


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link an unchanged file (free on the same file system), else copy it.

    A symlink is followed first: a Hub snapshot's files are relative links into the cache's blobs, and a link to
    the link itself would dangle in the new directory. The destination is then the source's file under a second
    name: anything that later changes it must replace it (`replace_file`), never write into it, or the source
    changes too.
    """
    source = source.resolve()
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)

"""Output folders that are never half-written, never lost, and checked before the slow work.

The guarantee of :func:`atomic_output_dir`: at every instant, the path ``out`` holds either its old
complete content (or nothing, if there was none) or the new complete output, never a mix and never
a partial one.

* The new output is written into a hidden sibling ``.NAME.partial-PID`` and published only when
  complete. A new folder is renamed into place. An existing one (``--overwrite``) is swapped with it
  in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old content, now at the
  hidden name, is removed.
* Where the exchange is not available (another OS or file system) the old folder is first renamed
  to ``.NAME.old-PID``, then the new one into place; an exception between the two (SIGTERM) puts
  the old one back, but a process killed outright between them leaves ``out`` absent until the next
  run restores the old folder (below).
* Any exception (Ctrl-C and, through the command line's handler, SIGTERM included) removes the
  partial folder and leaves ``out`` as it was. A process killed outright (SIGKILL, power loss) leaves
  its hidden folder behind: every later run for the same ``out`` first removes the ``.partial-PID``
  and ``.old-PID`` siblings whose process is gone, and puts an orphaned ``.old-PID`` back at ``out``
  if ``out`` is missing.

:func:`check_destination` runs before any model is read: the folder must be creatable and writable,
must not be or contain the source model, and its file system must have room for the checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import QuantkitError

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any long work) if ``out`` exists and may not be replaced (after cleaning up
    what killed runs left beside it: :func:`clean_stale`)."""
    out = Path(out)
    if out.is_symlink():
        raise QuantkitError(f"output path {out} is a symbolic link; pass the folder it points to")
    if out.name in ("", ".", "..") or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise QuantkitError(f"--out {out} is the current folder or one above it; name a new folder for the output")
    clean_stale(out)  # first: it may put an interrupted run's old output back at out
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output path {out} exists and is not a directory; choose another path")
    if out.exists() and not overwrite:
        raise QuantkitError(f"output directory {out} already exists; choose another path or pass --overwrite")
    return out


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_destination(out: str | Path, *, source: str | Path | None = None, needed_bytes: int = 0) -> None:
    """Refuse an output the run could not complete, or that would destroy its own input.

    ``out`` must not be ``source`` (the float model's folder), lie inside it, or contain it (replacing
    ``out`` would then delete the model). Its parent must be a folder that exists or can be created,
    and be writable; its file system must have ``needed_bytes`` free (an estimate of the output).
    """
    out = Path(out)
    target = out.resolve()
    if source is not None:
        src = Path(source).resolve()
        if target == src or src in target.parents:
            raise QuantkitError(f"--out {out} is inside the source model {source}; write the output elsewhere")
        if target in src.parents:
            raise QuantkitError(f"--out {out} contains the source model {source}; replacing it would delete the model")
    base = _existing_ancestor(target.parent)
    if not base.is_dir():
        raise QuantkitError(f"cannot create {out}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise QuantkitError(f"cannot write to {base} (permission denied); choose another --out")
    if needed_bytes:
        free = shutil.disk_usage(base).free
        if free < needed_bytes:
            raise QuantkitError(
                f"{base} has {free / 1e9:.2f} GB free, the output needs about {needed_bytes / 1e9:.2f} GB; "
                "free some space or choose another --out"
            )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove the hidden ``.NAME.partial-PID`` / ``.NAME.old-PID`` siblings of ``out`` left by runs that
    were killed; restore an orphaned old output if ``out`` itself is missing (see module docstring)."""
    parent = out.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    stale = []
    for entry in parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and not _pid_alive(int(m.group(2))):
            stale.append((m.group(1), entry))
    for kind, entry in sorted(stale, key=lambda s: s[0] != "old"):  # restore before removing
        if kind == "old" and not out.exists():
            entry.rename(out)
            log.warning("restored %s from %s, left by an interrupted run", out, entry.name)
        else:
            if entry.is_symlink():
                entry.unlink()
            else:
                shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by an interrupted run", entry)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where the system cannot."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``, replacing what is there (see module docstring)."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):  # out is the new folder; tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        out.rename(old)
        tmp.rename(out)
    except BaseException:  # e.g. SIGTERM between the renames: put the old output back
        if not out.exists() and old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block completes (module docstring).

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``out`` is
    left exactly as it was.
    """
    out = check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantkitError(f"cannot create {out.parent}: {e.strerror}") from None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise QuantkitError(f"cannot write to {out.parent}: {e.strerror}; choose another --out") from None
    try:
        yield tmp
        check_output_dir(out, overwrite)  # someone may have created it meanwhile
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling of the file ``path`` to write; it becomes ``path`` (one rename) only if the
    block completes, and is removed otherwise, so ``path`` is never half-written. The folder is
    created if need be; OS errors become one :class:`QuantkitError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QuantkitError(f"cannot create {path.parent}: {e.strerror}") from None
    if path.is_dir():
        raise QuantkitError(f"{path} is a folder; give a file name")
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise QuantkitError(f"cannot write {path}: {e.strerror}") from None
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file so that ``path`` is never half-written (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)

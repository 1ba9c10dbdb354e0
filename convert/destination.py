"""Where a conversion writes: the checks and the lock that keep it from destroying anything.

- the source and the destination never overlap, in either direction (compared as real paths);
- ``force`` replaces only an empty folder or an earlier mlx-gptoss conversion holding nothing else,
  the rule ``mlx-gptoss rm`` follows too (:func:`check_only_outputs`);
- one conversion at a time per destination (an flock'ed ``.DST.lock`` beside it), and the hidden
  folders left beside DST by a conversion that was killed are removed by the next one;
- the output must fit on the destination's disk;
- SIGTERM and SIGHUP stop a conversion like an error does, so its partial output is removed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_gptoss.safetensors_io import fsync_dir

from .layout import FORMAT_NAME
from .source import ConversionError

SPACE_MARGIN = 256 << 20  # metadata, tokenizer files and filesystem slack beyond the tensors
_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def destination(dst: str | Path) -> Path:
    """DST as an absolute path with a real parent (symlinks, ``..`` and ``.`` resolved), itself unresolved.

    The last component stays as given so that a symbolic link at DST is seen as a link.
    """
    p = Path(dst).expanduser()
    p = p.resolve() if p.name in ("", ".", "..") else p.parent.resolve() / p.name
    if p.name == "":
        raise ConversionError(f"{dst}: cannot convert into the filesystem root; give a new folder name")
    return p


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_no_overlap(sources: list[Path], dst: Path) -> None:
    """Refuse a destination that is, holds, or lies inside any of the source folders."""
    targets = {dst, dst.resolve()}  # DST itself, and where it points if it is a link
    for src in dict.fromkeys(s.resolve() for s in sources):
        for t in targets:
            rel = _relation(t, src)
            if rel is not None:
                raise ConversionError(
                    f"{dst}: the destination {rel} the source folder {src}; writing it would destroy the "
                    "source — choose a destination outside the source (e.g. a sibling folder)"
                )


def check_replaceable(dst: Path, is_output: Callable[[str], bool]) -> None:
    """Refuse to let ``force`` replace anything but an empty folder or an earlier mlx-gptoss conversion
    (:func:`check_only_outputs`, the rule ``mlx-gptoss rm`` follows too).

    ``is_output(name)`` says whether a file name is one a conversion writes.
    """
    how = "--force replaces only an empty folder or one written by mlx-gptoss convert"
    if dst.is_symlink() or not dst.is_dir():
        kind = "a symbolic link" if dst.is_symlink() else "not a folder"
        raise ConversionError(f"{dst}: exists and is {kind}; {how} — remove it yourself or choose another destination")
    cwd = Path.cwd().resolve()
    if cwd == dst.resolve() or dst.resolve() in cwd.parents:
        raise ConversionError(f"{dst}: is (or holds) the current directory; {how} — give a new folder, e.g. ./gpt-oss-mlx")
    if not any(dst.iterdir()):
        return
    check_only_outputs(dst, is_output, "--force")


def check_only_outputs(
    dst: Path, is_output: Callable[[str], bool], action: str, instead: str = "choose another destination"
) -> None:
    """Refuse ``action`` (which would delete the folder ``dst``) unless ``dst`` is an mlx-gptoss
    conversion holding nothing but files a conversion writes.

    The one rule for deleting a converted folder, whoever deletes it: ``--force`` replacing it
    (convert, export) and ``mlx-gptoss rm`` removing it from the cache. ``is_output(name)`` says
    whether a file name is one a conversion writes; subfolders, symbolic links and any other file
    are the user's (notes, an adapter trained into it), and the error names them. ``action`` and
    ``instead`` (what else to do) word the error.
    """
    try:
        fmt = json.loads((dst / "config.json").read_text()).get("mlx_gptoss", {}).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT_NAME:
        raise ConversionError(
            f"{dst}: exists and is not an mlx-gptoss conversion (its config.json has no "
            f'"mlx_gptoss": {{"format": "{FORMAT_NAME}"}}); {action} deletes only a folder mlx-gptoss convert wrote '
            f"— remove it yourself or {instead}"
        )
    extra = sorted(p.name for p in dst.iterdir() if p.is_symlink() or not p.is_file() or not is_output(p.name))
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise ConversionError(
            f"{dst}: holds {', '.join(extra[:5])}{more}, which a conversion does not write; {action} would "
            f"delete them — move them out first, or {instead}"
        )


def check_free_space(folder: Path, need: int) -> None:
    """Refuse when the disk holding ``folder`` (or its nearest existing parent) has less than ``need`` bytes free."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ConversionError(
            f"{folder}: not enough free space: the conversion needs {_gb(need)}, {_gb(free)} is free — "
            "free up space or choose a destination on another disk"
        )


class DestinationLock:
    """An exclusive lock on writing into ``dst`` (a conversion, a fuse, a training run): ``.DST.lock``
    beside it, flock'ed, holding our pid.

    The kernel drops an flock when its owner dies, so a killed run never blocks the next.
    """

    def __init__(self, dst: Path, what: str = "conversion") -> None:
        self.dst, self.what = dst, what  # what writes into dst, for the message
        self.path = dst.parent / f".{dst.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> DestinationLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConversionError(
                    f"{self.dst.parent}: cannot write there ({e.strerror}); the destination's folder must be writable"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConversionError(
                    f"{self.dst}: another {self.what} into it is running (pid {pid}, lock {self.path}); "
                    "wait for it to finish, or stop it and run again"
                ) from None
            # The previous owner unlinks the file on release: hold the lock only if ours is still the one there.
            try:
                st = os.stat(self.path)
                current = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)  # while still holding it, so no one else locks a file being removed
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def remove_stale(dst: Path) -> list[Path]:
    """Remove the hidden partial/old folders beside ``dst`` left by killed conversions; call holding its lock."""
    # tempfile.mkdtemp names: our prefix and 8 characters, nothing else.
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.(partial|old)-[a-z0-9_]{{8}}$")
    removed = []
    stale = sorted(p for p in dst.parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink())
    for p in stale:
        kept = p / dst.name
        # killed between moving the earlier conversion aside and moving the new one in: put it back
        if ".old-" in p.name and not (dst.exists() or dst.is_symlink()) and kept.is_dir():
            os.replace(kept, dst)
        shutil.rmtree(p)
        removed.append(p)
    return removed


@contextmanager
def claimed(dst: Path, need: int, recheck: Callable[[], None], what: str) -> Iterator[None]:
    """Hold ``dst`` for writing ``need`` bytes: SIGTERM/SIGHUP raise, its parent is made, its lock
    taken and the hidden folders an interrupted ``what`` left beside it removed; if ``dst`` exists
    by then, ``recheck()`` raises to refuse it (another writer may have finished meanwhile)."""
    with signals_as_errors(dst):
        if not dst.parent.is_dir():
            check_free_space(dst.parent, need)
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConversionError(f"{dst.parent}: cannot create it ({e.strerror})") from None
        with DestinationLock(dst, what):
            for p in remove_stale(dst):
                print(f"note: removed {p}, left by an interrupted {what}", file=sys.stderr)
            if dst.exists() or dst.is_symlink():
                recheck()
            check_free_space(dst.parent, need)
            yield


@contextmanager
def staged(dst: Path) -> Iterator[Path]:
    """A hidden sibling of ``dst`` to write the whole output into; call holding ``dst``'s lock.

    When the block ends, its files are synced and it is renamed to ``dst`` (an existing ``dst``
    moved aside first, then removed); when the block raises, it is removed and ``dst`` is untouched.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the model private to this user
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def signals_as_errors(dst: Path) -> Iterator[None]:
    """While converting (main thread only), SIGTERM and SIGHUP raise ConversionError, so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for s in _SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
        raise ConversionError(f"{dst}: conversion stopped by {signal.Signals(signum).name}; its partial output is removed")

    previous = {s: signal.signal(s, stop) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def describe_os_error(e: OSError, dst: str | Path) -> str:
    """One line for an OSError met while converting into ``dst``: what failed, on which path."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{dst}: conversion failed, nothing was left behind: {e.strerror or e}{where}"

"""Output files appear whole or not at all: written to a temporary file beside them, then renamed.

Temporary files (``.tmp-``) and staging folders (``.staging-``, see checkpoints/surgery.py) carry
their owner in their name (a hash of the host name and the process id), so a run that was killed
outright (SIGKILL, power loss) leaves something the next run in that folder recognises and removes.
SIGINT and SIGTERM wait while a temporary file or folder is being created, so that one always
exists under a name the cleanup knows.
"""

import atexit
import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from typing import IO, Iterator, List

from fairseq_moe_prune.errors import FairseqMoEPruneError

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
LEFTOVER = re.compile(r"^\.(tmp|staging)-([0-9a-f]{8})-(\d+)-")


def owner() -> str:
    """``<host hash>-<pid>``: who a temporary file or staging folder belongs to."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftovers(directory: str) -> None:
    """Remove the temporary files and staging folders of dead processes of this host in ``directory``."""
    host = owner().split("-")[0]
    for name in os.listdir(directory):
        match = LEFTOVER.match(name)
        if match and match.group(2) == host and not is_alive(int(match.group(3))):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


class OutputExistsError(FairseqMoEPruneError):
    """An output already exists and ``--force`` was not given."""


def refuse_existing(path: str, force: bool) -> None:
    """An existing output is replaced only with ``force``; without it, a one-line error."""
    if os.path.exists(path) and not force:
        raise OutputExistsError(f"{path} exists (use --force to replace it)")


def make_folder(directory: str) -> None:
    """``os.makedirs``, with the error a user understands when the path is a file."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", directory)
    os.makedirs(directory, exist_ok=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends; then they are delivered as usual."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path``, on any error it is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    make_folder(directory)
    remove_leftovers(directory)
    tmp = None
    try:
        with signals_held():  # a signal waits until the file has a name to remove
            handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{owner()}-", suffix=os.path.basename(path))
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        # see own_entries: a signal may have left mkstemp before it returned the name
        for leftover in [tmp] if tmp is not None else own_entries(directory, ".tmp-", os.path.basename(path)):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one, never a mix."""
    with atomic_open(path, "w") as f:
        f.write(text)


def own_entries(directory: str, prefix: str, suffix: str = "") -> List[str]:
    """This process's temporary files or staging folders in ``directory`` (their names carry :func:`owner`).

    Signal masks are per thread: a SIGTERM blocked around ``mkstemp``/``mkdtemp`` in this thread can still
    be taken by another thread (torch starts some), and Python then runs the handler in this one, possibly
    before the new name is returned; the entry is found again by its owner-stamped name.
    """
    start = f"{prefix}{owner()}-"
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if name.startswith(start) and name.endswith(suffix)]


def umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def exit_on_sigterm(signum: int, frame) -> None:
    """SIGTERM ends the process through ``sys.exit``, so that the files written at exit are written."""
    sys.exit(128 + signum)


class OutputWriteError(FairseqMoEPruneError):
    """An output file could not be written (full disk, read-only folder, a file where a folder should be)."""


class WrittenAtExit:
    """A file kept in memory: written (atomically, by the subclass's ``write``) when :meth:`open` is called,
    once more when the process ends, SIGTERM included, and a last time on :meth:`close`.

    SIGTERM would otherwise kill the process without running atexit (a Slurm job at its time limit): the
    first such file opened turns it into ``sys.exit`` (unless someone else installed a handler, which is left
    alone) and gives the default action back when it closes.

    A write that fails (``OSError``, e.g. a full disk) is an :class:`OutputWriteError` naming ``option`` and
    ``path``. At exit Python would only print an exception and keep the exit status (0 after a finished run),
    so the last writes of every open file are made by one handler that, if any failed, prints one line and
    ends the process with status 1: a run whose output is incomplete never looks successful."""

    option = "output"  # the command-line option that named the file, for messages
    path = ""
    sigterm_installed = False
    pending: List["WrittenAtExit"] = []  # open files, written once more at exit
    handler_registered = False

    def write(self) -> None:
        raise NotImplementedError

    def write_checked(self) -> None:
        """:meth:`write`, its ``OSError`` as a one-line error."""
        try:
            self.write()
        except OSError as error:
            raise OutputWriteError(f"{self.option} {self.path}: {error.strerror or error}") from None

    def open(self) -> None:
        self.write_checked()  # a valid file from the start
        WrittenAtExit.pending.append(self)
        if not WrittenAtExit.handler_registered:
            atexit.register(write_pending_at_exit)
            WrittenAtExit.handler_registered = True
        self.sigterm_installed = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        if self.sigterm_installed:
            signal.signal(signal.SIGTERM, exit_on_sigterm)

    def close(self) -> None:
        """Write the file a last time, and no more at exit."""
        if self in WrittenAtExit.pending:
            WrittenAtExit.pending.remove(self)
        if self.sigterm_installed and signal.getsignal(signal.SIGTERM) is exit_on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.sigterm_installed = False
        self.write_checked()


def write_pending_at_exit() -> None:
    """The atexit handler of :class:`WrittenAtExit`: write every open file; if one fails, say so in one line
    and exit with status 1 (``os._exit``: an exception raised here would not change the exit status)."""
    failures = []
    while WrittenAtExit.pending:
        written = WrittenAtExit.pending.pop()
        try:
            written.write_checked()
        except (FairseqMoEPruneError, SystemExit) as error:
            failures.append(str(error).removeprefix("error: "))
    if failures:
        print(f"error: {'; '.join(failures)}", file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)

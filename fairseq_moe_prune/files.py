"""Inputs are never touched, and outputs appear whole or not at all.

Every command that writes first calls :func:`check_output`: the output must not be, contain or lie inside
any file an input consists of, and its path must fit the file system's limits (checked before anything is
created). Outputs are written to a temporary file (:func:`atomic_open`) or a staging folder
(:func:`staged_directory`) beside them, then renamed.

Temporary files (``.tmp-``) and staging folders (``.staging-``) carry their owner in their name (a hash
of the host name and the process id), so a run that was killed outright (SIGKILL, power loss) leaves
something the next run in that folder recognises and removes. Their names are short whatever the output's
name (a legal output name never makes a temporary name too long), and no error names them.
SIGINT and SIGTERM wait while a temporary file or folder is being created, so that one always
exists under a name the cleanup knows. Input folders are listed with :func:`regular_files`: a FIFO or a
device is never opened.
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
import stat
import sys
import tempfile
from typing import IO, Iterable, Iterator, List

from fairseq_moe_prune.errors import FairseqMoEPruneError

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
LEFTOVER = re.compile(r"^\.(tmp|staging)-([0-9a-f]{8})-(\d+)-")
NAME_MAX = 255  # bytes in a file name (Linux's file systems)
PATH_MAX = 4096  # bytes in a path, its terminating NUL included
INNER_NAMES = 512  # bytes an output folder's path leaves for the names written inside it


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


class OutputPathError(FairseqMoEPruneError):
    """An output overlaps an input, or its path does not fit the file system's limits."""


class NotRegularFileError(FairseqMoEPruneError, OSError):
    """An input that must be a regular file is a FIFO, a device or a socket (an OSError too, for the readers
    that report why a file cannot be read)."""

    def __init__(self, path: str):
        super().__init__(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)", path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def check_output(out: str, inputs: Iterable[str], force: bool) -> None:
    """The one check every writing command makes before it creates anything.

    Refuses an output that is, contains or lies inside one of ``inputs`` (every file an input consists of:
    a checkpoint and its rank files, an HF folder and its shards, statistics and calibration files), symbolic
    links resolved, even with ``force``; a path longer than the file system allows; and an existing output
    without ``force``.
    """
    check_path_fits(out)
    output = os.path.realpath(out)
    for path in inputs:
        source = os.path.realpath(path)
        if os.path.commonpath([source, output]) in (source, output) or same_file(source, output):
            raise OutputPathError(f"{out} and the input {path} overlap (inputs are never modified)")
    refuse_existing(out, force)


def input_files(path: str) -> List[str]:
    """``path``, and where it is a folder (an HF model, calibration samples) every entry in it: a symbolic link
    there may point elsewhere (Hugging Face's cache links to its blobs), which :func:`check_output` resolves."""
    if not os.path.isdir(path):
        return [path]
    return [path, *(os.path.join(path, name) for name in sorted(os.listdir(path)))]


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_path_fits(out: str) -> None:
    """Every name in the output's path fits NAME_MAX, and the path leaves room for the names inside it."""
    encoded = os.fsencode(os.path.abspath(out))
    longest = max(len(part) for part in encoded.split(b"/"))
    if longest > NAME_MAX:
        raise OutputPathError(f"a name in the output path is {longest} bytes long; a file name has at most {NAME_MAX}")
    if len(encoded) > PATH_MAX - INNER_NAMES:
        raise OutputPathError(f"the output path is {len(encoded)} bytes long; at most {PATH_MAX - INNER_NAMES} "
                              "leave room for the files written inside it")


def is_plain_name(name: str) -> bool:
    """A file name and nothing else: no folder, no ``..``, nothing absolute, and not too long."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and \
        len(os.fsencode(name)) <= NAME_MAX


def is_regular_file(path: str) -> bool:
    """``path`` is a regular file (or a symbolic link to one); found by ``stat``, nothing is opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str) -> IO[str]:
    """Open a text file for reading, refusing anything but a regular file without waiting (a FIFO would block)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        check_regular(os.fstat(fd).st_mode, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def regular_files(folder: str, suffix: str) -> List[str]:
    """The names of ``folder``'s files ending in ``suffix`` (hidden ones left out), in order; any of them that
    is not a regular file (a FIFO, a device, a folder) is refused rather than opened."""
    names = sorted(name for name in os.listdir(folder) if name.endswith(suffix) and not name.startswith("."))
    for name in names:
        require_regular_file(os.path.join(folder, name))
    return names


def require_regular_file(path: str) -> str:
    """``path``, if it is a regular file (found by ``stat``: nothing is opened); an OSError that says what it
    is otherwise (missing, a folder, a FIFO, a device)."""
    check_regular(os.stat(path).st_mode, path)
    return path


def check_regular(mode: int, path: str) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(path)


def refuse_existing(path: str, force: bool) -> None:
    """An existing output is replaced only with ``force``; without it, a one-line error."""
    if os.path.lexists(path) and not force:
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
    tag = name_tag(path)
    try:
        with signals_held():  # a signal waits until the file has a name to remove
            handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{owner()}-", suffix=tag)
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        # see own_entries: a signal may have left mkstemp before it returned the name
        for leftover in [tmp] if tmp is not None else own_entries(directory, ".tmp-", tag):
            if os.path.exists(leftover):
                os.unlink(leftover)
        if isinstance(error, OSError) and tmp is not None:
            raise named_as(error, tmp, path) from None
        raise


def name_tag(path: str) -> str:
    """What a temporary file's name carries of its output's: a short hash (a long name would not fit)."""
    return "-" + hashlib.sha256(os.fsencode(os.path.basename(path))).hexdigest()[:8]


def named_as(error: OSError, temporary: str, final: str) -> OSError:
    """``error`` with the temporary file or folder it names replaced by the output it stands for."""
    if temporary not in (error.filename, error.filename2):
        return error
    return OSError(error.errno, error.strerror, final)


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


def remove_entry(path: str) -> None:
    """Remove a file, a symbolic link (never what it points to) or a folder with its contents."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def publish_directory(staging: str, out: str, force: bool) -> None:
    """Move a finished staging folder to ``out``; an existing ``out`` (a folder, a file or a symbolic link) is
    replaced only with ``force``."""
    if os.path.lexists(out):
        refuse_existing(out, force)
        trash = staging + "-old"
        with signals_held():  # never stop between taking the old output away and putting the new one there
            os.replace(out, trash)
            try:
                os.replace(staging, out)
            except OSError:
                os.replace(trash, out)  # the old output back where it was
                raise
        remove_entry(trash)
    else:
        os.replace(staging, out)


@contextlib.contextmanager
def staged_directory(out: str, force: bool) -> Iterator[str]:
    """A staging folder beside ``out``: it becomes ``out`` when the block succeeds and vanishes when it fails.

    Its name says whose it is (:func:`owner`), so the leftovers of a killed run are removed by the next.
    """
    parent = os.path.dirname(os.path.abspath(out))
    make_folder(parent)
    remove_leftovers(parent)
    staging = None
    try:
        with signals_held():  # a signal waits until the folder has a name to remove
            staging = tempfile.mkdtemp(dir=parent, prefix=f".staging-{owner()}-")
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes 0700
        yield staging
        publish_directory(staging, out, force)
    except BaseException as error:
        # A stop signal can reach another thread (torch's) while this one is blocking it, and its handler
        # then runs inside mkdtemp, before the name is returned: such a folder is still this process's own.
        for leftover in [staging] if staging is not None else own_entries(parent, ".staging-"):
            if os.path.lexists(leftover):
                remove_entry(leftover)
        if isinstance(error, OSError) and staging is not None:
            raise named_as(error, staging, out) from None
        raise

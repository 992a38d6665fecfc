"""The one error type users see (a message that names the problem and the fix), and how the command-line tools end
on it, on an interrupt or on a termination signal: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Callable
from functools import wraps
from typing import NoReturn


class FastDiffError(Exception):
    """A problem with the user's input, artifact or machine, reported without a traceback."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

    def __reduce__(self) -> tuple:  # whole, from a worker process
        return type(self), (self.problem, self.fix)


def import_torch() -> None:
    """Import torch so that a Ctrl-C or a termination signal during the import (seconds) stops the command: torch's C
    extension imports numpy itself and drops any exception raised in there, so a signal landing in numpy's import was
    lost (the command went on) or left numpy half-imported (a confusing error later). numpy is imported first here,
    from Python, where the exception propagates."""
    import numpy  # noqa: F401
    import torch  # noqa: F401


def exit_interrupted(message: str, code: int = 130) -> NoReturn:
    """How a command ends on Ctrl-C (130) or a termination signal: a line on stderr, no traceback."""
    print(message, file=sys.stderr)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a service manager stopping the command, a closed terminal), raised where the main thread is
    so that cleanups run as for Ctrl-C: no partial artifact or image file is left behind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_stop_signal: int | None = None  # the Ctrl-C or termination signal received, if any


def _stop(signum: int, frame) -> None:
    global _stop_signal
    _stop_signal = signum
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def raise_if_stopped() -> None:
    """Raise again a Ctrl-C or termination signal that was swallowed where it landed: Python ignores an exception
    raised in a finalizer (`__del__`; seen in torch.export), and some C code drops them, so a command could finish
    and write its output after being told to stop. Called before each step that writes or takes long."""
    if _stop_signal is not None:
        raise KeyboardInterrupt if _stop_signal == signal.SIGINT else Terminated(_stop_signal)


def _exit_stopped(interrupted: str, signum: int) -> NoReturn:
    """Ctrl-C -> exit 130; SIGTERM, SIGHUP -> 128 + the signal's number, the signal named."""
    if signum == signal.SIGINT:
        exit_interrupted(interrupted)
    exit_interrupted(f"{interrupted} ({signal.Signals(signum).name})", 128 + signum)


def clean_errors(interrupted: str = "interrupted") -> Callable[[Callable], Callable]:
    """FastDiffError -> its message on stderr and exit code 2 (a device out of memory, or a file that cannot be read or
    written, too); Ctrl-C -> `interrupted` and exit 130, SIGTERM and SIGHUP the same with exit 128 + the signal's
    number, whatever error the signal turned into on its way out. Bad input never shows a traceback (the
    fastdiff-export command uses this too)."""

    def decorate(fn: Callable) -> Callable:
        @wraps(fn)
        def wrapper(*args, **kwargs):
            stopping = [signal.SIGTERM, signal.SIGHUP]
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
                stopping.append(signal.SIGINT)
            global _stop_signal
            _stop_signal = None  # a stop belongs to one command (tests run several in one process)
            previous = {signum: signal.signal(signum, _stop) for signum in stopping}
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                _exit_stopped(interrupted, signal.SIGINT)
            except Terminated as e:
                _exit_stopped(interrupted, e.signum)
            except Exception as e:
                # torch can turn the stop into an error of its own (a signal landing in its tracing came out as one in
                # CI, exit 1 with a traceback); once told to stop, whatever ends the command is that stop
                if _stop_signal is not None:
                    _exit_stopped(interrupted, _stop_signal)
                if isinstance(e, FastDiffError):
                    print(f"error: {e}", file=sys.stderr)
                    sys.exit(2)
                if (error := _environment_error(e)) is None:
                    raise
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

        return wrapper

    return decorate


# What a full disk or a read-only folder raises, also from inside a compile that wraps it in its own error.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _environment_error(error: Exception) -> FastDiffError | None:
    """The machine's fault rather than the command's: the device out of memory, or a file that cannot be read or
    written (a permission, a full disk); None for anything else."""
    torch = sys.modules.get("torch")  # an error from torch means torch is imported; the CLI imports it lazily
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        problem = f"out of memory on the device: {str(error).splitlines()[0]}"
        return FastDiffError(
            problem, "free memory there (other processes), load fewer resolutions (--res), or use a larger device"
        )
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or (cause is not error and cause.errno not in _STORAGE_ERRNOS):
        return None
    where = f": {cause.filename}" if cause.filename else ""
    problem = f"{cause.strerror or cause}{where}"
    if cause.errno in _STORAGE_ERRNOS:
        return FastDiffError(problem, "check the path's permissions and the free space on its disk")
    if cause.filename and _in_fastdiff(str(cause.filename)):  # a file fastdiff ships is missing or unreadable
        return FastDiffError(problem, "reinstall fastdiff; if a fresh install still fails, report it as a bug")
    return FastDiffError(problem, "check the path")


def _in_fastdiff(path: str) -> bool:
    """Whether `path` lies in fastdiff's own package folders (the runtime's or the exporter's)."""
    import importlib.util
    import os

    exporter = importlib.util.find_spec("fastdiff.exporter")
    folders = [os.path.dirname(__file__), *((exporter and exporter.submodule_search_locations) or [])]
    return any(os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep) for folder in folders)

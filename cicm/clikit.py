"""What every `cicm` command shares: the exit codes, the error line, and the common options.

Exit codes (the same for every command, and in the README):

| code | meaning |
|---:|---|
| 0 | ok |
| 1 | bad input: a flag, file, environment variable or stored data was refused; the message names the field |
| 2 | degraded: the command ran, but with fallbacks or failures that are stored or printed with their reasons |

Errors go to stderr as one line, ``error: <field>: <what>``, so that ``--json`` output on stdout stays one JSON
document.
"""
from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from enum import IntEnum
from typing import Any, Iterator, NoReturn

import typer


class ExitCode(IntEnum):
    OK = 0
    BAD_INPUT = 1
    DEGRADED = 2


def fail(error: Exception | str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    """Print ``error: ...`` on stderr and exit with ``code``."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise typer.Exit(int(code))


def exit_degraded_unless(ok: bool) -> None:
    """Exit 2 when a command ran but did not end ok (its output already says why)."""
    if not ok:
        raise typer.Exit(int(ExitCode.DEGRADED))


DB_HELP = "DuckDB store (default: var/cicm.duckdb, or $CICM_HOME/cicm.duckdb)"


def db_option(help: str = DB_HELP) -> Any:
    """The ``--db`` option of every command that reads or writes the store (typed Any: a Typer default fits any
    parameter annotation)."""
    return typer.Option(None, "--db", help=help)


def fleet_option() -> Any:
    """The ``--fleet`` option of every command that reads the fleet file."""
    return typer.Option(None, "--fleet", help="fleet TOML (default: the bundled demo fleet, cicm/demo/data/demo_fleet.toml)")


def use_exit_code_table() -> None:
    """Click exits 2 on a usage error (an unknown flag, a missing file argument); in this table 2 means degraded,
    so make such errors bad input (1). Called once by the `cicm` entry point. Typer ships its own copy of Click
    (``typer._click``), which is the one its commands raise from; the installed Click is set too."""
    import importlib

    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.UsageError.exit_code = int(ExitCode.BAD_INPUT)


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived (raised by ``interruptible``'s handler). A BaseException, so that no ``except
    Exception`` fallback swallows it: it unwinds to the store's run, which rolls back and records the run as
    failed with "Interrupted: interrupted by SIGTERM"."""

    signal_name = "a signal"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or f"interrupted by {self.signal_name}")


def _interrupted_by(name: str) -> type[Interrupted]:
    """Interrupted for one signal, as a class (an asynchronous exception is raised from its class), named
    Interrupted so that a run's message reads "Interrupted: interrupted by SIGTERM"."""
    return type("Interrupted", (Interrupted,), {"signal_name": name, "__module__": __name__})


def _raise_in_this_thread_soon(exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in this (the main) thread at its next Python bytecode, not here. A signal handler runs
    either between bytecodes or inside C code that checks for signals (PyErr_CheckSignals): DuckDB does so while
    it runs a query, and turns an exception raised there into ``RuntimeError: Query interrupted``, an ordinary
    Exception that fallbacks (the SLO stage's) swallowed, and the plan went on to commit as 'degraded'. Raised as
    an asynchronous exception, the query finishes and the exception comes out of the Python code that called it."""
    import ctypes
    import threading

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), ctypes.py_object(exc_type))


def _cancel_pending_raise() -> None:
    import ctypes
    import threading

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)


#: The handler of the ``interruptible`` block in force, if any (``reinstate_interrupt_handler`` puts it back).
_ACTIVE_HANDLER: list[Any] = []
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def interruptible() -> Iterator[None]:
    """The one place that handles SIGTERM and SIGINT for the commands that write runs (`cicm plan`, `cicm carbon
    fetch`): the first signal raises ``Interrupted`` in the main thread (at its next Python bytecode, so that no C
    extension converts it into an ordinary error, see ``_raise_in_this_thread_soon``); the transaction open at that
    point rolls back and the run is recorded with the reason; the command then exits 2 (degraded) with one error
    line. Should the exception be lost all the same (swallowed by C code or a fallback), no store transaction
    commits after the signal (``cicm.commitguard.COMMIT_CHECKS``). Further signals are ignored while that cleanup runs (SIGKILL still ends the process; the next writer
    then marks the run abandoned). During a Prefect flow run Prefect installs its own SIGTERM handler; the flow
    puts this one back (``reinstate_interrupt_handler``)."""
    received: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        if received:
            return
        received.append(signal.Signals(signum).name)
        _raise_in_this_thread_soon(_interrupted_by(received[0]))

    def no_commit_after_a_signal() -> None:
        if received:
            raise _interrupted_by(received[0])()

    from cicm.commitguard import COMMIT_CHECKS

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    _ACTIVE_HANDLER.append(handler)
    COMMIT_CHECKS.append(no_commit_after_a_signal)
    try:
        try:
            yield
        finally:  # a signal that came as the block ended must not be raised after it
            if received:
                _cancel_pending_raise()
        if received:
            raise _interrupted_by(received[0])()
    except Interrupted as exc:
        fail(str(exc), ExitCode.DEGRADED)
    finally:
        _ACTIVE_HANDLER.remove(handler)
        COMMIT_CHECKS.remove(no_commit_after_a_signal)
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def reinstate_interrupt_handler() -> Iterator[None]:
    """Put ``interruptible``'s handler back for this block, if a command is in one (else do nothing). For the
    Prefect flow body: Prefect replaces SIGTERM's handler during a flow run with one that raises its
    ``TerminationSignal`` at once, which DuckDB turns into ``RuntimeError: Query interrupted`` when it lands
    during a query: the SIGTERM was then lost and the plan committed. Not in the main thread: nothing to do."""
    import threading

    if not _ACTIVE_HANDLER or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _ACTIVE_HANDLER[-1]) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)

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


@contextmanager
def interruptible() -> Iterator[None]:
    """The one place that handles SIGTERM and SIGINT for the commands that write runs (`cicm plan`, `cicm carbon
    fetch`): the first signal raises ``Interrupted`` in the main thread; the transaction open at that point rolls
    back and the run is recorded with the reason; the command then exits 2 (degraded) with one error line. Further
    signals are ignored while that cleanup runs (SIGKILL still ends the process; the next writer then marks the
    run abandoned)."""
    signals = (signal.SIGTERM, signal.SIGINT)
    received: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        if received:
            return
        received.append(signal.Signals(signum).name)
        raise Interrupted(f"interrupted by {received[0]}")

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    except Interrupted as exc:
        fail(str(exc), ExitCode.DEGRADED)
    finally:
        for s, old in previous.items():
            signal.signal(s, old)

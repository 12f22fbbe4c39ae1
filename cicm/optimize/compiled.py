"""Compiled cvxpy programs, kept and re-solved with new data (issue 19: the backtest's ~1,570 queue solves per zone
and policy, and small campuses, were dominated by cvxpy's compilation, not by HiGHS).

A program that is solved again and again with the same *structure* (the same variables, the same sparsity of its
rows, the same set of row blocks) and different *data* (carbon, arrivals, bounds, right-hand sides, ...) is built
once as a DPP program: the data are ``cp.Parameter`` s, and cvxpy compiles the problem the first time it is solved
into a map from the parameters to the solver's arrays (its ``ParamConeProg``). Every later ``solve`` only applies
that map to the new parameter values (a sparse matrix-vector product) before HiGHS runs; the reduction chain is
not run again. The program stays a cvxpy program.

:class:`ProgramCache` keeps such programs by a structure key, bounded (least recently used first out), since a
compiled program holds its problem, its chain and the parameter map (tens of kB for a backtest campus, more for a
large campus). A key must name everything the structure depends on: a key that misses a structural input would
re-use a program built for another shape (the parameter shapes would then refuse the values, or worse, a row block
would be silently absent), so the builders check the values they are given against the shapes they were built for.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

T = TypeVar("T")

#: Programs kept per cache by default. The backtest solves ~10 structures per campus and day (clusters shaped,
#: horizon length, committed hours, hull segments, with or without a plan of record or peak rows); 64 keeps them.
DEFAULT_MAXSIZE = 64
#: Columns of the largest program compiled (about 100 clusters over 42 hours): a compiled program keeps its
#: parameter-to-LP map, a few times the LP's nonzeros, and a large campus is solved once a night (its compilation
#: is then a small part of the solve anyway).
DEFAULT_MAX_COLUMNS = 60_000
#: Columns of all the programs kept: a few large programs (a 100-cluster one keeps tens of MB) or many small ones.
DEFAULT_MAX_TOTAL_COLUMNS = 250_000
#: Solves of a structure before it is compiled as a parametrised program (the first solve of a structure builds a
#: one-off problem, which compiles faster than a DPP program: a structure seen once, like the shrinking horizons
#: at the end of a backtest window, never pays for the DPP compilation).
DEFAULT_COMPILE_AFTER = 1


class ProgramCache(Generic[T]):
    """A bounded LRU map from a structure key to a compiled program. Thread-safe: a program is handed to one
    thread at a time (:meth:`take` removes it, :meth:`put` returns it), so two threads never set the parameters
    of the same cvxpy problem at once; a thread that finds its key taken builds a one-off problem instead.

    :meth:`compile_now` decides when a key is worth compiling: after ``compile_after`` earlier solves of it, and
    only for programs of at most ``max_columns`` columns. The keys seen are remembered in a bounded LRU too. The
    programs kept are bounded in number (``maxsize``) and in columns summed (``max_total_columns``)."""

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE, max_columns: int = DEFAULT_MAX_COLUMNS,
                 compile_after: int = DEFAULT_COMPILE_AFTER, max_total_columns: int = DEFAULT_MAX_TOTAL_COLUMNS):
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self.max_columns = max_columns
        self.compile_after = compile_after
        self.max_total_columns = max_total_columns
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._columns: dict[Hashable, int] = {}
        self._seen: OrderedDict[Hashable, int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.compiled = 0

    def __len__(self) -> int:
        return len(self._items)

    def take(self, key: Hashable) -> T | None:
        """The program kept for ``key`` (removed until :meth:`put` returns it), or None."""
        with self._lock:
            item = self._items.pop(key, None)
            self._columns.pop(key, None)
            if item is None:
                self.misses += 1
            else:
                self.hits += 1
            return item

    def compile_now(self, key: Hashable, columns: int) -> bool:
        """Whether to compile a program for ``key`` now (a miss): it fits, the cache is on, and the key was solved
        ``compile_after`` times before. Counts this solve."""
        with self._lock:
            n = self._seen.pop(key, 0)
            self._seen[key] = n + 1
            while len(self._seen) > 16 * max(self.maxsize, 1):
                self._seen.popitem(last=False)
            ok = self.maxsize > 0 and columns <= self.max_columns and n >= self.compile_after
            self.compiled += ok
            return ok

    @property
    def columns(self) -> int:
        """Columns of the programs kept, summed."""
        return sum(self._columns.values())

    def put(self, key: Hashable, item: T, columns: int = 0) -> None:
        """Keep ``item`` (a program of ``columns`` columns) as the most recently used program for ``key``; drop the
        least recently used beyond ``maxsize`` programs or ``max_total_columns`` columns."""
        if self.maxsize == 0 or columns > self.max_total_columns:
            return
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            self._columns[key] = columns
            while len(self._items) > self.maxsize or sum(self._columns.values()) > self.max_total_columns:
                old, _ = self._items.popitem(last=False)
                self._columns.pop(old, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._columns.clear()
            self._seen.clear()
            self.hits = self.misses = self.compiled = 0

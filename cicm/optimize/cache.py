"""Matrix LPs as DPP-parametrised cvxpy programs, compiled once per structure and cached (issue 19, item 2).

A program that solves many LPs of the same shape (the nightly plan's same-shaped campuses, a backtest's days, the
hourly re-plan) pays cvxpy's compilation once per *structure* instead of once per solve. The LP

    min sum(c * x)  s.t.  E @ x == 0,  G @ x <= h,  lower <= x <= upper

is built as a cvxpy program whose numbers are all Parameters: the stored entries of E and G are Parameter vectors
v, and ``E @ x`` is ``R @ (v * (C @ x))`` with constant 0/1 matrices C (each entry's column) and R (each entry's
row); c, h, lower and upper are dense Parameters. cvxpy compiles it once (DPP: its compiled problem maps the
parameter values to the solver's data by one sparse product), and a re-solve only assigns the values. The solver
gets the same LP as from a program built with the numbers as constants, bit for bit (same columns, rows and
coefficients; ``tests/test_optimize_cache.py`` checks it on random LPs and campuses). One difference remains for
the caller: cvxpy clips a solution into a variable's constant bounds but not into Parameter bounds, so the caller
clips (``cicm.optimize.program._solve_matrix_lp``).

The structure is the number of columns and the sparsity patterns of E and G (their stored entries, in order). A
cache entry keeps the patterns and is used only when they are equal, element by element, to the LP's (the digest
only finds the candidate): a structure change never reuses a wrong program. The cache is an LRU of at most
:data:`MAX_PROGRAMS` programs, holds only LPs of at most :data:`MAX_ENTRIES` columns and entries, and compiles a
program only the second time its structure is seen (:meth:`ProgramCache.lookup`): a structure seen once is solved
by a fresh constant program, which compiles faster than the parametrised one.

cvxpy 1.9 counts a variable with Parameter bounds as parametrised, so a Parameter times it (``c * x``, ``E @ x``)
fails its DPP check, although the bounds only become the solver's column bounds (through cvxpy's own bound
tensors, not through any product). :class:`_Columns` is a cvxpy Variable that reports no parameters while cvxpy
checks DPP, and its bound parameters everywhere else, so cvxpy compiles the program as DPP with the bounds as
parameters.
"""
from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
from cvxpy.utilities import scopes

#: At most this many compiled programs are kept (least recently used first out).
MAX_PROGRAMS = 16
#: Structures seen once are remembered (digests only) up to this many, to compile a program at the second sight.
MAX_SEEN = 256
#: LPs with more columns, or more entries in E or G, are not cached (about 10 clusters of the ceiling program).
#: cvxpy 1.9 compiles a Parameter times an expression (``v * (C @ x)``, ``c * x``) through a stacked sparse matrix
#: of (parameter entries x rows) rows, so its DPP compilation grows with the square of the entries: 24 ms and a few
#: MB for a one-cluster campus, 160 ms and 65 MB at 10 clusters with peak rows (3,900 entries), 0.7 s and 240 MB at
#: 20, 17 s and 6 GB at 100. Larger LPs are solved by a fresh program every time; their compilation is a smaller
#: part of the solve anyway.
MAX_ENTRIES = 4_000


class _Columns(cp.Variable):
    """A cvxpy Variable with Parameter bounds that DPP accepts next to Parameter coefficients (see the module)."""

    def parameters(self):
        return [] if scopes.dpp_scope_active() else super().parameters()


def _pattern(m: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every stored entry of ``m`` in its CSR order."""
    return np.repeat(np.arange(m.shape[0]), np.diff(m.indptr)), m.indices


def structure_key(n_cols: int, eq: sp.csr_matrix, ineq: sp.csr_matrix | None, solver: str) -> tuple:
    """The digest that finds a cached program for an LP (equal structures have equal keys; a hit is then checked
    element by element)."""
    h = hashlib.blake2b(digest_size=20)
    for m in (eq, ineq):
        if m is None:
            h.update(b"none")
            continue
        h.update(np.asarray(m.shape, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(m.indptr, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(m.indices, dtype=np.int64).tobytes())
    return (solver, int(n_cols), h.hexdigest())


class MatrixLP:
    """One structure's LP as a DPP-parametrised cvxpy program (see the module). ``eq`` and ``ineq`` (CSR without
    duplicate entries) give the patterns, their stored entries in their order; the values are set by
    :meth:`assign`. Two LPs share a program only if their stored patterns are the same in the same order."""

    def __init__(self, n_cols: int, eq: sp.csr_matrix, ineq: sp.csr_matrix | None):
        self.n_cols = int(n_cols)
        self.eq_shape, self.eq_indptr, self.eq_indices = eq.shape, eq.indptr.copy(), eq.indices.copy()
        if ineq is None:
            self.ineq_shape, self.ineq_indptr, self.ineq_indices = None, None, None
        else:
            self.ineq_shape, self.ineq_indptr, self.ineq_indices = ineq.shape, ineq.indptr.copy(), ineq.indices.copy()
        self.lower = cp.Parameter(n_cols, name="lower")
        self.upper = cp.Parameter(n_cols, name="upper")
        self.c = cp.Parameter(n_cols, name="c")
        self.x = _Columns(n_cols, name="lp", bounds=[self.lower, self.upper])
        self.eq, eq_x = self._product(eq, self.x, "E")
        cons = [eq_x == 0]
        self.ineq: cp.Parameter | None = None
        self.h: cp.Parameter | None = None
        if ineq is not None:
            self.ineq, ineq_x = self._product(ineq, self.x, "G")
            self.h = cp.Parameter(ineq.shape[0], name="h")
            cons.append(ineq_x <= self.h)
        self.problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(self.c, self.x))), cons)
        self.lock = threading.Lock()

    @staticmethod
    def _product(m: sp.csr_matrix, x: cp.Variable, name: str) -> tuple[cp.Parameter, cp.Expression]:
        """A Parameter v for the stored entries of ``m`` (in CSR order) and the expression ``m @ x`` on it:
        ``R @ (v * (C @ x))``, with C picking each entry's column and R summing the entries of each row (constant
        0/1 matrices), so each coefficient the solver gets is one entry of v, times 1.

        Not a sparse cvxpy Parameter (``Parameter(shape, sparsity=...)``): cvxpy 1.9 reads such a parameter's
        dense value at every solve (rows x columns floats)."""
        row, col = _pattern(m)
        nnz = row.size
        v = cp.Parameter(nnz, name=name)
        pick = sp.csr_matrix((np.ones(nnz), (np.arange(nnz), col)), shape=(nnz, m.shape[1]))
        sum_rows = sp.csr_matrix((np.ones(nnz), (row, np.arange(nnz))), shape=(m.shape[0], nnz))
        return v, sum_rows @ cp.multiply(v, pick @ x)

    def matches(self, n_cols: int, eq: sp.csr_matrix, ineq: sp.csr_matrix | None) -> bool:
        """Is this program's structure exactly that of the LP (checked element by element)?"""
        if n_cols != self.n_cols or eq.shape != self.eq_shape or not (
                np.array_equal(eq.indptr, self.eq_indptr) and np.array_equal(eq.indices, self.eq_indices)):
            return False
        if ineq is None or self.ineq_indptr is None or self.ineq_indices is None:
            return ineq is None and self.ineq_indptr is None
        return (ineq.shape == self.ineq_shape and np.array_equal(ineq.indptr, self.ineq_indptr)
                and np.array_equal(ineq.indices, self.ineq_indices))

    def assign(self, c: np.ndarray, eq: sp.csr_matrix, ineq: sp.csr_matrix | None, rhs: np.ndarray | None,
               lower: np.ndarray, upper: np.ndarray) -> None:
        """Set the parameters to one LP of this structure (the caller checked it with :meth:`matches`)."""
        self.c.value = c
        self.lower.value = lower
        self.upper.value = upper
        self.eq.value = eq.data
        if self.ineq is not None:
            assert ineq is not None and rhs is not None and self.h is not None
            self.ineq.value = ineq.data
            self.h.value = rhs


@dataclass
class CacheStats:
    """What the cache did since the last :func:`clear` (the bench reads it to say whether a solve was a hit)."""

    hits: int = 0  # solved by a cached program
    compiled: int = 0  # programs compiled (second sight of a structure)
    fresh: int = 0  # solved by a fresh constant program (first sight, or not cacheable)
    evicted: int = 0


class ProgramCache:
    """A bounded LRU of :class:`MatrixLP` per structure, thread-safe (plans may run on threads)."""

    def __init__(self, max_programs: int = MAX_PROGRAMS, max_seen: int = MAX_SEEN, max_entries: int = MAX_ENTRIES):
        self.max_programs, self.max_seen, self.max_entries = max_programs, max_seen, max_entries
        self.programs: OrderedDict[tuple, MatrixLP] = OrderedDict()
        self.seen: OrderedDict[tuple, None] = OrderedDict()
        self.stats = CacheStats()
        self.lock = threading.Lock()

    def cacheable(self, n_cols: int, eq: sp.csr_matrix, ineq: sp.csr_matrix | None) -> bool:
        """Is the LP small enough to compile as a parametrised program (:data:`MAX_ENTRIES`)?"""
        return self.max_programs > 0 and max(n_cols, eq.nnz, 0 if ineq is None else ineq.nnz) <= self.max_entries

    def clear(self) -> None:
        with self.lock:
            self.programs.clear()
            self.seen.clear()
            self.stats = CacheStats()

    def lookup(self, n_cols: int, eq: sp.csr_matrix, ineq: sp.csr_matrix | None, solver: str) -> MatrixLP | None:
        """The cached program of this LP's structure, or a newly built one at the structure's second sight, or None
        (first sight, or too large: solve it fresh). The caller holds the program's lock while it solves."""
        if not self.cacheable(n_cols, eq, ineq):
            with self.lock:
                self.stats.fresh += 1
            return None
        key = structure_key(n_cols, eq, ineq, solver)
        with self.lock:
            prog = self.programs.get(key)
            if prog is not None and prog.matches(n_cols, eq, ineq):
                self.programs.move_to_end(key)
                self.stats.hits += 1
                return prog
            if prog is None and key not in self.seen:
                self.seen[key] = None
                while len(self.seen) > self.max_seen:
                    self.seen.popitem(last=False)
                self.stats.fresh += 1
                return None
            # Second sight (or a digest collision with another structure: replace it).
            prog = MatrixLP(n_cols, eq, ineq)
            self.seen.pop(key, None)
            self.programs[key] = prog
            self.programs.move_to_end(key)
            while len(self.programs) > self.max_programs:
                self.programs.popitem(last=False)
                self.stats.evicted += 1
            self.stats.compiled += 1
            return prog


#: The process-wide cache of the programs' LPs.
CACHE = ProgramCache()


def run_problem(problem: cp.Problem, solver, options: dict) -> str | None:
    """Solve ``problem``; return None, or the error text if the solver raised."""
    try:
        with warnings.catch_warnings():  # "solution may be inaccurate": the status says it, and we check
            warnings.simplefilter("ignore", UserWarning)
            problem.solve(solver=solver, **options)
    except Exception as exc:  # noqa: BLE001 - any solver failure becomes a visible fallback
        name = solver if isinstance(solver, str) else solver.name()
        return f"{name}: {type(exc).__name__}: {exc}"
    return None

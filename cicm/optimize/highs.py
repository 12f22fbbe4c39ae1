"""HiGHS for the programs' cvxpy problems, handing the LP over as arrays (issue 19, speed).

cvxpy's own HiGHS interface (``cvxpy.reductions.solvers.conic_solvers.highs_conif``) copies the LP into a
``highspy.HighsModel`` attribute by attribute: pybind11 then converts every numpy array element by element into a
``std::vector``, which took 20-25 ms of a 1,000-cluster ceiling campus (as long as cvxpy's whole canonicalisation
of its constraints), and it asks HiGHS for the basis, which nothing reads. :data:`HIGHS` is the same interface
with the model passed through ``Highs.passModel``'s array form (a buffer copy) and without the basis. The problem
stays a cvxpy problem, compiled by the same reductions into the same LP; only the hand-over differs, so HiGHS gets
the identical LP and returns the identical solution (``tests/test_optimize_speed.py`` compares the plans).

Use ``problem.solve(solver=solver_for("HIGHS"), ...)``: :func:`solver_for` returns this instance for ``"HIGHS"``
and the name itself for any other solver.
"""
from __future__ import annotations

import numpy as np
from cvxpy import settings as s
from cvxpy.error import SolverError
from cvxpy.reductions.solvers.conic_solvers.conic_solver import dims_to_solver_dict
from cvxpy.reductions.solvers.conic_solvers.highs_conif import HIGHS as _CvxpyHighs
from cvxpy.reductions.solvers.conic_solvers.highs_conif import unpack_highs_options_inplace


class ArrayHighs(_CvxpyHighs):
    """cvxpy's conic HiGHS interface, passing the model to highspy as arrays. LPs only (no integer variables)."""

    MIP_CAPABLE = False

    def name(self):
        return "CICM_HIGHS"  # a custom solver's name must differ from cvxpy's own

    def solve_via_data(self, data, warm_start: bool, verbose: bool, solver_opts, solver_cache=None):
        import highspy as hp

        if data.get(s.BOOL_IDX) or data.get(s.INT_IDX):
            raise SolverError("CICM_HIGHS solves LPs only")
        dims = dims_to_solver_dict(data[s.DIMS])
        c = np.ascontiguousarray(data[s.C], dtype=np.float64)
        a = data[s.A].tocsc()
        b = np.ascontiguousarray(data[s.B], dtype=np.float64)
        n_col, n_row = a.shape[1], a.shape[0]
        inf = hp.kHighsInf
        n_eq, n_leq = dims[s.EQ_DIM], dims[s.LEQ_DIM]
        row_lower = np.concatenate([b[:n_eq], np.full(n_leq, -inf)])
        lb, ub = data[s.LOWER_BOUNDS], data[s.UPPER_BOUNDS]
        col_lower = np.full(n_col, -inf) if lb is None else np.ascontiguousarray(lb, dtype=np.float64)
        col_upper = np.full(n_col, inf) if ub is None else np.ascontiguousarray(ub, dtype=np.float64)

        solver = hp.Highs()
        opts = dict(solver_opts)
        unpack_highs_options_inplace(opts)
        opts.pop("write_model_file", None)
        solver.setOptionValue("log_to_console", verbose)
        for name, value in opts.items():
            if solver.setOptionValue(name, value) == hp.HighsStatus.kError:
                raise ValueError(f"HIGHS returned status kError for option (name, value): ({name}, {value})")
        status = solver.passModel(n_col, n_row, int(a.nnz), int(hp.MatrixFormat.kColwise),
                                  int(hp.ObjSense.kMinimize), 0.0, c, col_lower, col_upper, row_lower, b,
                                  a.indptr[:-1].astype(np.int32), a.indices.astype(np.int32, copy=False),
                                  np.ascontiguousarray(a.data, dtype=np.float64),
                                  np.zeros(n_col, dtype=np.int32))  # all continuous (an empty array is misread)
        if status == hp.HighsStatus.kError:
            raise SolverError("HiGHS refused the model")
        try:
            solver.run()
            results = {"solution": solver.getSolution(), "info": solver.getInfo(),
                       "model_status": solver.getModelStatus().name, "run_time": solver.getRunTime()}
            if results["model_status"] == "kInfeasible":
                results["dual_ray"] = solver.getDualRay()  # type: ignore[attr-defined]  # bound, not in the stub
        except ValueError as e:
            raise SolverError(e) from None
        return results


#: The one instance the programs use.
HIGHS = ArrayHighs()


def solver_for(name: str):
    """What to pass as ``problem.solve(solver=...)`` for the solver ``name``."""
    return HIGHS if name == "HIGHS" else name

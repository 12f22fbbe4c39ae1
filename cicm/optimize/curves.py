"""Power curves of many clusters at once: evaluation and lower convex hulls on padded arrays (no loop over clusters).

The VCC program needs, for every cluster with a :class:`~cicm.optimize.inputs.PowerCurve`, the curve's value at
C x H usages and the segments of its lower convex hull over the usage range its plan can reach. Curves have
different numbers of breakpoints; they are packed into (C, P) arrays padded by repeating the last breakpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Points within this fraction of |y|max * (x range) of the chord of their neighbours count as on it (dropped from
#: the hull: a straight stretch is one segment).
COLLINEAR_RTOL = 1e-13


@dataclass(frozen=True)
class CurveTable:
    """Piecewise-linear curves P_c(u), one row per cluster, extended linearly beyond the ends (as PowerCurve).

    ``x``, ``y``: (C, P) breakpoints (cores) and powers (kW), padded by repeating the last breakpoint; ``n``: (C,)
    the number of real breakpoints (>= 2); ``has``: (C,) whether the row is a real curve (rows without one hold a
    dummy zero line).
    """

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    has: np.ndarray

    @classmethod
    def pack(cls, curves: Sequence) -> "CurveTable":
        """Pack PowerCurve objects (or None) into one table."""
        n = np.array([2 if c is None else len(c.cpu_cores) for c in curves], dtype=int)
        p = int(n.max(initial=2))
        x = np.empty((len(curves), p))
        y = np.empty((len(curves), p))
        for i, c in enumerate(curves):  # O(C) copies of a few numbers
            cx, cy = (np.array([0.0, 1.0]), np.zeros(2)) if c is None else (c.cpu_cores, c.power_kw)
            x[i, :cx.size], x[i, cx.size:] = cx, cx[-1]
            y[i, :cy.size], y[i, cy.size:] = cy, cy[-1]
        return cls(x=x, y=y, n=n, has=np.array([c is not None for c in curves], dtype=bool))

    def _segment(self, u: np.ndarray) -> np.ndarray:
        """(C, H) index of the segment that holds u: the end segments beyond the breakpoints."""
        j = (u[:, :, None] >= self.x[:, None, 1:]).sum(axis=2)
        return np.minimum(j, (self.n - 2)[:, None])

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """P_c(u[c, h]) for a (C, H) array of usages."""
        u = np.asarray(u, dtype=float)
        j = self._segment(u)
        x0, x1 = np.take_along_axis(self.x, j, 1), np.take_along_axis(self.x, j + 1, 1)
        y0, y1 = np.take_along_axis(self.y, j, 1), np.take_along_axis(self.y, j + 1, 1)
        return y0 + (y1 - y0) / (x1 - x0) * (u - x0)

    def slope_at(self, u: np.ndarray) -> np.ndarray:
        u = np.asarray(u, dtype=float)
        j = self._segment(u)
        x0, x1 = np.take_along_axis(self.x, j, 1), np.take_along_axis(self.x, j + 1, 1)
        y0, y1 = np.take_along_axis(self.y, j, 1), np.take_along_axis(self.y, j + 1, 1)
        return (y1 - y0) / (x1 - x0)


@dataclass(frozen=True)
class Hulls:
    """The segments of each curve's lower convex hull over [lo_c, hi_c], flat: row c owns the segments
    ``start[c]:start[c+1]`` (none for rows without a curve), segment s is a_s + b_s*u on [x0_s, x1_s], in order of
    u. ``gap``: (C,) the largest amount (kW) by which the curve rises above its hull on the range (0 if convex)."""

    start: np.ndarray
    a: np.ndarray
    b: np.ndarray
    x0: np.ndarray
    x1: np.ndarray
    gap: np.ndarray

    def padded(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, K) intercepts and slopes, rows with fewer than K segments padded by repeating their last segment
        (rows without a curve: a zero line)."""
        count = np.diff(self.start)
        k = int(count.max(initial=1))
        col = np.minimum(np.arange(k)[None, :], np.maximum(count - 1, 0)[:, None])
        pick = np.minimum(self.start[:-1, None] + col, max(self.a.size - 1, 0))
        if self.a.size == 0:
            return np.zeros((count.size, 1)), np.zeros((count.size, 1))
        has = (count > 0)[:, None]
        return np.where(has, self.a[pick], 0.0), np.where(has, self.b[pick], 0.0)


def lower_hulls(table: CurveTable, lo: np.ndarray, hi: np.ndarray, *, convex_rtol: float) -> Hulls:
    """Lower convex hulls of every real curve of ``table`` over [lo_c, hi_c] (arrays of C).

    On [lo, hi] a curve is piecewise linear with the breakpoints inside the range, so its hull is the hull of those
    points and the two ends. The hull is found for all rows at once by repeatedly dropping the points that are not
    strictly below the chord of their kept neighbours (such a point is never a hull vertex), never two neighbours
    in the same pass; at most P + 2 passes. ``gap`` below ``convex_rtol`` x the largest |power| on the range counts
    as 0.
    """
    c, p = table.x.shape
    lo = np.asarray(lo, dtype=float)
    hi = np.asarray(hi, dtype=float)
    hi = np.where(hi > lo, hi, lo + np.maximum(1.0, np.abs(lo)))  # degenerate range: any non-empty one does
    ends = table(np.stack([lo, hi], axis=1))
    px = np.concatenate([lo[:, None], table.x, hi[:, None]], axis=1)  # (C, P+2), increasing among valid points
    py = np.concatenate([ends[:, :1], table.y, ends[:, 1:]], axis=1)
    inner = (np.arange(p)[None, :] < table.n[:, None]) & (table.x > lo[:, None]) & (table.x < hi[:, None])
    valid = np.concatenate([np.ones((c, 1), bool), inner, np.ones((c, 1), bool)], axis=1) & table.has[:, None]
    q = p + 2
    cols = np.arange(q)[None, :]
    scale = COLLINEAR_RTOL * np.abs(np.where(valid, py, 0.0)).max(axis=1) * (hi - lo) + 1e-300

    def neighbours(mask):
        prev = np.maximum.accumulate(np.where(mask, cols, -1), axis=1)
        prev = np.concatenate([np.full((c, 1), -1), prev[:, :-1]], axis=1)
        nxt = np.minimum.accumulate(np.where(mask, cols, q)[:, ::-1], axis=1)[:, ::-1]
        nxt = np.concatenate([nxt[:, 1:], np.full((c, 1), q)], axis=1)
        return prev, nxt

    keep = valid.copy()
    for _ in range(q + 1):
        prev, nxt = neighbours(keep)
        mid = keep & (prev >= 0) & (nxt < q)
        pi, ni = np.clip(prev, 0, q - 1), np.clip(nxt, 0, q - 1)
        xp, yp = np.take_along_axis(px, pi, 1), np.take_along_axis(py, pi, 1)
        xn, yn = np.take_along_axis(px, ni, 1), np.take_along_axis(py, ni, 1)
        cross = (px - xp) * (yn - yp) - (py - yp) * (xn - xp)  # > 0: strictly below the chord
        cand = mid & (cross <= scale[:, None])
        if not cand.any():
            break
        # Never drop two neighbours in one pass: each was judged against the other, and with (near-)duplicate
        # breakpoints, as fitted curves have, both can be "on the chord" while one of them is a hull vertex.
        prev_cand = np.take_along_axis(cand, np.clip(prev, 0, q - 1), 1) & (prev >= 0)
        keep &= ~(cand & ~prev_cand)

    # Segments between consecutive kept points of a row (np.nonzero walks row by row, in order of u).
    rows, colk = np.nonzero(keep)
    same = rows[1:] == rows[:-1]
    hx, hy = px[rows, colk], py[rows, colk]
    x0, x1, y0, y1 = hx[:-1][same], hx[1:][same], hy[:-1][same], hy[1:][same]
    b = (y1 - y0) / (x1 - x0)
    a = y0 - b * x0
    count = np.bincount(rows[:-1][same], minlength=c)
    start = np.concatenate([[0], np.cumsum(count)])

    # Gap: the curve above the hull at the dropped points (the hull interpolates the kept neighbours).
    prev, nxt = neighbours(keep)
    pi, ni = np.clip(prev, 0, q - 1), np.clip(nxt, 0, q - 1)
    xp, yp = np.take_along_axis(px, pi, 1), np.take_along_axis(py, pi, 1)
    xn, yn = np.take_along_axis(px, ni, 1), np.take_along_axis(py, ni, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        hull_at = yp + (yn - yp) * (px - xp) / (xn - xp)
    above = np.where(valid & ~keep & (prev >= 0) & (nxt < q), py - hull_at, 0.0)
    gap = np.maximum(above.max(axis=1), 0.0)
    big = np.abs(np.where(valid, py, 0.0)).max(axis=1)
    gap = np.where(gap > convex_rtol * big, gap, 0.0)
    return Hulls(start=start, a=a, b=b, x0=x0, x1=x1, gap=gap)

"""Power-law fits of the scaling sweep's final losses, with bootstrap intervals and saturation points.

Two forms, fitted the way Hoffmann et al. (2022, "Chinchilla", approach 3) fit theirs:

- per (vision, llm) curve: ``L(D) = E + B / D^beta`` (D = training samples);
- per llm, jointly over its encoders: ``L(N, D) = E + A / N^alpha + B / D^beta`` (N = vision parameters).

The objective is ``sum Huber_delta(log L_pred - log L_obs)`` (delta ~1e-3: nearly an L1 fit in log
space, so one bad cell cannot drag the curve), minimised by scipy's L-BFGS-B (analytic gradient,
float64) from the best points of a grid of starts. Positive parameters are optimised through their logs and the prediction is a
log-sum-exp of the terms, so the search is unconstrained, E stays >= 0 and nothing takes the log of
a negative. Exponents (alpha, beta) are free, as in Hoffmann et al.

Why ``scipy.optimize.minimize(method="L-BFGS-B")`` with the gradient written out, rather than
``least_squares(loss="huber")``: the objective is the same (``least_squares`` minimises delta times
this sum), but a bootstrap draw is a weight per point here, and a weighted Huber sum is not a
robust least-squares problem (``huber(sqrt(w) r) != w huber(r)``), so ``least_squares`` would need
the duplicated rows; it also cost more per evaluation in a trial on these fits (SVD of the Jacobian
each step, plus the robust-loss rescaling) for as many evaluations. L-BFGS-B on the Huber sum is
also what Hoffmann et al. and later replications run.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import scipy
from scipy.optimize import minimize
from scipy.special import logsumexp

from cumo_megatron.research.results_csv import FitRow, SweepRow, as_fit_row

CURVE = "curve"
JOINT = "joint"
# Reported parameter names of each form, in the order of the optimiser's vector (e, [a, alpha,] b, beta).
PARAM_NAMES = {CURVE: ("E", "B", "beta"), JOINT: ("E", "A", "alpha", "B", "beta")}
FORMULAS = {CURVE: "L(D) = E + B / D^beta", JOINT: "L(N, D) = E + A / N^alpha + B / D^beta"}

# Start grid, in units of the smallest observed loss (E, coefficients at the data's geometric-mean
# scale) and plain exponents; wide enough for LM losses of any size, small enough to screen at once.
_E_FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.97)
_COEF_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
_EXPONENTS = (0.05, 0.1, 0.2, 0.4, 0.7, 1.2)
# Fewest distinct values per axis that pin a form down (three per power law: E, coefficient, exponent).
_MIN_DISTINCT = 3
# exp(-800) is 0.0 and exp(800) inf in float64.
_LOG_CLIP = 800.0


@dataclass(frozen=True)
class PowerLawFit:
    """One fitted power law, its data, and per-point residuals ``log L_pred - log L_obs``.

    ``params`` are in the data's own units (D in samples, N in parameters). ``theta`` and
    ``scales`` are the optimiser's view (logs of positive parameters, axes divided by their
    geometric mean), kept so bootstrap refits can start from this solution.
    """

    form: str
    params: dict[str, float]
    data_sizes: tuple[float, ...]
    vision_params: Optional[tuple[float, ...]]  # joint form only
    losses: tuple[float, ...]
    residuals: tuple[float, ...]
    objective: float
    theta: tuple[float, ...]
    scales: tuple[float, ...]  # (D scale) or (N scale, D scale)

    @property
    def rmse_log(self) -> float:
        """Root mean square of the log residuals."""
        return float(np.sqrt(np.mean(np.square(self.residuals))))

    def predict(self, data_sizes, vision_params=None) -> np.ndarray:
        """Predicted loss at ``data_sizes`` (and, for the joint form, ``vision_params``)."""
        return predict(self.form, self.params, data_sizes, vision_params)

    def saturation_data_size(self, epsilon: float) -> float:
        """Data size beyond which doubling D gains less than ``epsilon`` (see `saturation_data_size`)."""
        return saturation_data_size(self.params["B"], self.params["beta"], epsilon)


def predict(form: str, params: dict[str, float], data_sizes, vision_params=None) -> np.ndarray:
    """The form's loss at the given points, from parameters in the data's units."""
    d = np.asarray(data_sizes, dtype=np.float64)
    loss = params["E"] + params["B"] * d ** -params["beta"]
    if form == JOINT:
        if vision_params is None:
            raise ValueError("the joint form needs vision_params")
        n = np.asarray(vision_params, dtype=np.float64)
        loss = loss + params["A"] * n ** -params["alpha"]
    return loss


def saturation_data_size(b: float, beta: float, epsilon: float) -> float:
    """Smallest D from which every further doubling of data gains less than ``epsilon`` in loss.

    ``L(D) - L(2D) = B D^-beta (1 - 2^-beta)`` falls with D when ``B, beta > 0``, so the point is
    ``(B (1 - 2^-beta) / epsilon)^(1/beta)``. With ``B <= 0`` or ``beta <= 0`` more data never gains
    (the gain is <= 0 everywhere): 0.0. Beyond the float range (a tiny beta): inf.
    """
    with np.errstate(over="ignore"):
        return float(np.exp(_log_saturation(b, beta, epsilon)))


def _log_saturation(b: float, beta: float, epsilon: float) -> float:
    """log of `saturation_data_size`, clipped to where exp gives 0.0 .. inf (so percentiles stay defined)."""
    if not epsilon > 0:
        raise ValueError(f"saturation epsilon must be > 0, got {epsilon}")
    if not (b > 0 and beta > 0):
        return -_LOG_CLIP
    value = (math.log(b) + math.log1p(-2.0 ** -beta) - math.log(epsilon)) / beta
    return min(max(value, -_LOG_CLIP), _LOG_CLIP)


@functools.lru_cache(maxsize=None)
def _scipy_openblas() -> Optional[ctypes.CDLL]:
    """scipy's bundled OpenBLAS (the one L-BFGS-B calls), or None for a scipy built otherwise."""
    folder = Path(scipy.__file__).resolve().parent.parent / "scipy.libs"
    for path in sorted(folder.glob("libscipy_openblas*.so*")):
        lib = ctypes.CDLL(str(path))  # already loaded by scipy: the same handle
        if hasattr(lib, "scipy_openblas_set_num_threads") and hasattr(lib, "scipy_openblas_get_num_threads"):
            return lib
    return None


@contextmanager
def _one_blas_thread():
    """Run the block with scipy's OpenBLAS on one thread, then restore its count.

    L-BFGS-B calls BLAS on 3-5 numbers per step, where threads only add hand-offs: on a busy
    machine they made a whole fit 5x slower. threadpoolctl does this generally but is not a
    dependency; with another BLAS this does nothing (set OPENBLAS_NUM_THREADS=1 there).
    """
    lib = _scipy_openblas()
    if lib is None:
        yield
        return
    before = lib.scipy_openblas_get_num_threads()
    lib.scipy_openblas_set_num_threads(1)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(before)


def _terms(theta: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The log of each additive term, [1 + k, ..., n]: ``e`` and, per axis j, ``c_j - p_j * coord_j``.

    ``theta`` is one optimiser vector [p] or a stack of them [S, p]; ``coords`` [k, n] are the logs
    of the normalised axes.
    """
    shape = theta.shape[:-1] + coords.shape[1:]
    terms = [np.broadcast_to(theta[..., :1], shape)]
    for j in range(coords.shape[0]):
        coef, power = theta[..., 1 + 2 * j: 2 + 2 * j], theta[..., 2 + 2 * j: 3 + 2 * j]
        terms.append(coef - power * coords[j])
    return np.stack(terms)


def _log_predict(theta: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """log L at every point: the log-sum-exp of the terms, [..., n]."""
    return logsumexp(_terms(theta, coords), axis=0)


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss of each residual divided by delta: ``r^2 / (2 delta)`` inside delta, ``|r| - delta/2`` beyond.

    Dividing by delta keeps the argmin and makes gradients O(1), so the optimiser's tolerances
    mean the same whatever delta is.
    """
    size = np.abs(residual)
    return np.where(size < delta, 0.5 * residual**2 / delta, size - 0.5 * delta)


@dataclass(frozen=True)
class _Problem:
    """One fit's points in the optimiser's coordinates, and the weight of each point.

    Weights are how often each point is counted: all ones for a fit, the draw counts for a
    bootstrap resample (a point drawn twice adds its loss twice, exactly as a duplicated row).
    """

    coords: np.ndarray  # [k, n] logs of the axes over their scales
    log_obs: np.ndarray  # [n]
    delta: float
    # Derived in __post_init__ so that `objective` (called ~70 times per optimiser run, on 5-40
    # points, where numpy's per-call overhead is the cost) is a handful of whole-array operations.
    _x: np.ndarray = field(init=False, repr=False)  # [1 + k, n]: a zero row (for e), then coords
    _coef_index: np.ndarray = field(init=False, repr=False)  # theta's e, c_1, ..., c_k
    _power_index: np.ndarray = field(init=False, repr=False)  # theta's p_1, ..., p_k

    def __post_init__(self) -> None:
        k = self.coords.shape[0]
        object.__setattr__(self, "_x", np.vstack([np.zeros((1, self.coords.shape[1])), self.coords]))
        object.__setattr__(self, "_coef_index", np.asarray([0] + [1 + 2 * j for j in range(k)]))
        object.__setattr__(self, "_power_index", np.asarray([2 + 2 * j for j in range(k)]))

    def objective(self, theta: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
        """Weighted Huber sum of the log residuals and its gradient.

        The gradient is written out (scipy then needs no finite differences): with ``w`` the
        softmax of the terms and ``psi`` the Huber derivative, d/de = sum psi w_0,
        d/dc_j = sum psi w_j, d/dp_j = -sum psi w_j coord_j.
        """
        powers = np.zeros(self._x.shape[0])
        powers[1:] = theta[self._power_index]
        terms = theta[self._coef_index][:, None] - powers[:, None] * self._x  # [1 + k, n], as `_terms`
        top = terms.max(axis=0)
        exps = np.exp(terms - top)
        total = exps.sum(axis=0)
        residual = top + np.log(total) - self.log_obs
        value = float(_huber(residual, self.delta) @ weights)
        weighted = exps * (np.clip(residual / self.delta, -1.0, 1.0) * weights / total)
        grad = np.empty_like(theta)
        grad[self._coef_index] = weighted.sum(axis=1)
        grad[self._power_index] = -(weighted[1:] * self.coords).sum(axis=1)
        return value, grad

    def grid_losses(self, grid: np.ndarray) -> np.ndarray:
        """Per-point Huber loss of every grid start, [S, n]: a start's score is this times the weights."""
        return _huber(_log_predict(grid, self.coords) - self.log_obs, self.delta)

    def minimize(self, start: np.ndarray, weights: np.ndarray, max_iter: int, tolerance: float) -> tuple[np.ndarray, float]:
        """scipy's L-BFGS-B from one start; the end point and its objective (inf when it diverged).

        Stops when an iteration changes the objective by less than ``tolerance`` relative to
        ``max(|objective|, 1)`` (scipy's ``ftol``), or after ``max_iter`` iterations. A line search
        that cannot progress ends the run where it stands, which near the Huber kink is the optimum
        to within delta.
        """
        with _one_blas_thread():
            result = minimize(
                self.objective, start, args=(weights,), jac=True, method="L-BFGS-B",
                options={"maxiter": max_iter, "ftol": tolerance, "gtol": 1e-10, "maxcor": 10},
            )
        theta, value = np.asarray(result.x, dtype=np.float64), float(result.fun)
        if not (math.isfinite(value) and np.all(np.isfinite(theta))):
            return theta, math.inf
        return theta, value

    def best_of(self, starts, weights: np.ndarray, max_iter: int, tolerance: float) -> tuple[Optional[np.ndarray], float]:
        """The lowest end point over runs from ``starts`` (None, inf when every run diverged)."""
        best_theta, best_value = None, math.inf
        for start in starts:
            theta, value = self.minimize(np.asarray(start, dtype=np.float64), weights, max_iter, tolerance)
            if value < best_value:
                best_theta, best_value = theta, value
        return best_theta, best_value


def _grid(n_axes: int, min_loss: float) -> np.ndarray:
    """All grid starts as optimiser vectors, [S, 1 + 2 * n_axes]."""
    e = [math.log(min_loss * f) for f in _E_FRACTIONS]
    coef = [math.log(min_loss * f) for f in _COEF_FRACTIONS]
    per_axis = list(itertools.product(coef, _EXPONENTS))
    rows = [(ev,) + sum(axes, ()) for ev in e for axes in itertools.product(per_axis, repeat=n_axes)]
    return np.asarray(rows, dtype=np.float64)


def _axes(form: str, data_sizes, vision_params) -> np.ndarray:
    """The fit's axes as rows of a [k, n] array: (D) or (N, D)."""
    if form == CURVE:
        return np.asarray([data_sizes], dtype=np.float64)
    if form == JOINT:
        return np.asarray([vision_params, data_sizes], dtype=np.float64)
    raise ValueError(f"unknown power-law form {form!r}; use {CURVE!r} or {JOINT!r}")


def _identifiable(form: str, axes: np.ndarray) -> Optional[str]:
    """Why these points cannot pin the form down, or None when they can."""
    names = ("data sizes",) if form == CURVE else ("vision encoder sizes", "data sizes")
    for name, values in zip(names, axes):
        distinct = len(np.unique(values))
        if distinct < _MIN_DISTINCT:
            return f"needs at least {_MIN_DISTINCT} distinct {name}, has {distinct}"
    return None


def _problem(form: str, data_sizes, losses, vision_params, delta: float, scales) -> tuple[_Problem, np.ndarray, np.ndarray, tuple[float, ...]]:
    """Checked points as an optimisation problem, their axes [k, n], losses [n], and the axes' scales."""
    axes = _axes(form, data_sizes, vision_params)
    obs = np.asarray(losses, dtype=np.float64)
    if axes.shape[1] != obs.shape[0]:
        raise ValueError(f"power-law fit: {axes.shape[1]} points but {obs.shape[0]} losses")
    if not (np.all(np.isfinite(obs)) and np.all(obs > 0) and np.all(np.isfinite(axes)) and np.all(axes > 0)):
        raise ValueError("power-law fit: losses, data sizes and vision sizes must be positive finite numbers")
    reason = _identifiable(form, axes)
    if reason is not None:
        raise ValueError(f"power-law fit ({FORMULAS[form]}): {reason}")
    if scales is None:
        scales = tuple(float(np.exp(np.mean(np.log(np.unique(a))))) for a in axes)
    coords = np.log(axes / np.asarray(scales, dtype=np.float64)[:, None])
    return _Problem(coords, np.log(obs), delta), axes, obs, tuple(float(s) for s in scales)


def fit_power_law(
    form: str,
    data_sizes: Sequence[float],
    losses: Sequence[float],
    vision_params: Optional[Sequence[float]] = None,
    *,
    delta: float = 1e-3,
    starts: int = 8,
    max_iter: int = 500,
    tolerance: float = 1e-12,
    scales: Optional[Sequence[float]] = None,
    extra_starts: Sequence[Sequence[float]] = (),
) -> PowerLawFit:
    """Fit ``form`` (`CURVE` or `JOINT`) to the points; the best of L-BFGS-B runs from several starts.

    The whole start grid is scored at once and scipy's L-BFGS-B runs from its ``starts`` best
    points plus ``extra_starts`` (optimiser vectors at ``scales``). ``scales`` divide the axes
    before the log (default: their geometric means) so that the coefficients' logs and the
    exponents are of order one. ``tolerance`` is L-BFGS-B's relative ``ftol``. Raises
    ``ValueError`` for points that cannot determine the form (non-positive values, too few
    distinct sizes) or when every run diverged.
    """
    problem, axes, obs, scales = _problem(form, data_sizes, losses, vision_params, delta, scales)
    weights = np.ones(problem.log_obs.shape[0])
    grid = _grid(len(axes), float(obs.min()))
    order = np.argsort(problem.grid_losses(grid) @ weights, kind="stable")
    candidates = list(grid[order[:starts]]) + [np.asarray(s, dtype=np.float64) for s in extra_starts]
    theta, value = problem.best_of(candidates, weights, max_iter, tolerance)
    if theta is None:
        raise ValueError(f"power-law fit ({FORMULAS[form]}): every start diverged")
    return _make_fit(form, problem, axes, obs, scales, theta, value)


def _make_fit(
    form: str, problem: _Problem, axes: np.ndarray, obs: np.ndarray, scales: tuple[float, ...], theta: np.ndarray, value: float
) -> PowerLawFit:
    """The `PowerLawFit` of an optimiser end point (``ValueError`` when its parameters overflow)."""
    params = _to_params(form, theta, scales)
    if not all(math.isfinite(v) for v in params.values()):
        raise ValueError(f"power-law fit ({FORMULAS[form]}): parameters overflowed ({params})")
    residuals = _log_predict(theta, problem.coords) - problem.log_obs
    return PowerLawFit(
        form=form,
        params=params,
        data_sizes=tuple(float(v) for v in axes[-1]),
        vision_params=tuple(float(v) for v in axes[0]) if form == JOINT else None,
        losses=tuple(float(v) for v in obs),
        residuals=tuple(float(v) for v in residuals),
        objective=value,
        theta=tuple(float(v) for v in theta),
        scales=scales,
    )


def _to_params(form: str, theta: np.ndarray, scales: Sequence[float]) -> dict[str, float]:
    """Optimiser vector -> parameters in data units: ``exp(c) / (x / s)^p = exp(c) s^p / x^p``."""
    values = [theta[0]]
    for j, scale in enumerate(scales):
        coef, power = theta[1 + 2 * j], theta[2 + 2 * j]
        values += [coef + power * math.log(scale), power]
    with np.errstate(over="ignore"):
        values = [float(np.exp(v)) if i == 0 or i % 2 == 1 else float(v) for i, v in enumerate(values)]
    return dict(zip(PARAM_NAMES[form], values))


def fit_curve(data_sizes: Sequence[float], losses: Sequence[float], **kwargs) -> PowerLawFit:
    """Fit ``L(D) = E + B / D^beta`` (keyword options as in `fit_power_law`)."""
    return fit_power_law(CURVE, data_sizes, losses, **kwargs)


def fit_joint(vision_params: Sequence[float], data_sizes: Sequence[float], losses: Sequence[float], **kwargs) -> PowerLawFit:
    """Fit ``L(N, D) = E + A / N^alpha + B / D^beta`` (keyword options as in `fit_power_law`)."""
    return fit_power_law(JOINT, data_sizes, losses, vision_params, **kwargs)


@dataclass(frozen=True)
class Bootstrap:
    """Parameters refitted on resampled points: ``samples`` [used resamples, parameters]."""

    names: tuple[str, ...]
    samples: np.ndarray
    requested: int  # resamples drawn; those that could not determine the form are skipped

    @property
    def used(self) -> int:
        """Resamples that gave a fit."""
        return int(self.samples.shape[0])

    def interval(self, values: np.ndarray, confidence: float) -> Optional[tuple[float, float]]:
        """Percentile interval of ``values`` (one per used resample); None without resamples."""
        if not 0 < confidence < 1:
            raise ValueError(f"bootstrap confidence must be in (0, 1), got {confidence}")
        if len(values) == 0:
            return None
        tail = 100.0 * (1.0 - confidence) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return float(low), float(high)

    def intervals(self, confidence: float) -> dict[str, Optional[tuple[float, float]]]:
        """Percentile interval of every parameter."""
        return {name: self.interval(self.samples[:, i], confidence) for i, name in enumerate(self.names)}

    def saturation_interval(self, epsilon: float, confidence: float) -> Optional[tuple[float, float]]:
        """Percentile interval of the saturation data size (see `saturation_data_size`)."""
        b, beta = self.samples[:, self.names.index("B")], self.samples[:, self.names.index("beta")]
        logs = np.array([_log_saturation(bi, betai, epsilon) for bi, betai in zip(b, beta)])
        interval = self.interval(logs, confidence)
        if interval is None:
            return None
        with np.errstate(over="ignore"):
            return float(np.exp(interval[0])), float(np.exp(interval[1]))


def bootstrap(
    fit: PowerLawFit,
    resamples: int,
    seed: Union[int, Sequence[int]],
    *,
    delta: float = 1e-3,
    starts: int = 1,
    max_iter: int = 500,
    tolerance: float = 1e-9,
    progress: Optional[Callable[[], None]] = None,
) -> Bootstrap:
    """Refit ``fit``'s form on ``resamples`` draws of its points with replacement.

    A draw is a weight per point (how often it was drawn), so a refit costs no more than the fit.
    Each refit runs L-BFGS-B from the full fit's solution, and from those of the draw's ``starts``
    best grid points that score below that solution on the draw (the grid's per-point losses are
    computed once; a draw's scores are one product with its weights). Draws that cannot determine the form (too few distinct sizes) are
    skipped and counted out of `Bootstrap.used`. ``progress()`` is called once per draw. Refits
    stop at a looser ``tolerance`` than a fit: on draws that leave the form nearly undetermined
    the optimiser otherwise crawls along a flat valley, and where it stops there moves the
    parameters far less than the draws scatter.
    """
    rng = np.random.default_rng(seed)
    problem, axes, obs, _ = _problem(fit.form, fit.data_sizes, fit.losses, fit.vision_params, delta, fit.scales)
    n = obs.shape[0]
    grid = _grid(axes.shape[0], float(obs.min()))
    grid_losses = problem.grid_losses(grid) if starts > 0 else None
    names = PARAM_NAMES[fit.form]
    samples = []
    for _ in range(resamples):
        # The same draws as resampling the rows: n indices with replacement.
        weights = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
        if _identifiable(fit.form, axes[:, weights > 0]) is None:
            full = np.asarray(fit.theta)
            candidates = [full]
            if grid_losses is not None:
                # Only grid points that already beat the full solution on this draw can lead to
                # another basin worth the run; a run from each would triple the cost for nothing
                # (intervals measured the same on the seed paper's shape).
                scores = grid_losses @ weights
                best = np.argsort(scores, kind="stable")[:starts]
                candidates += list(grid[best[scores[best] < problem.objective(full, weights)[0]]])
            theta, _value = problem.best_of(candidates, weights, max_iter, tolerance)
            params = None if theta is None else _to_params(fit.form, theta, fit.scales)
            if params is not None and all(math.isfinite(v) for v in params.values()):
                samples.append([params[name] for name in names])
        if progress is not None:
            progress()
    return Bootstrap(names=names, samples=np.asarray(samples, dtype=np.float64).reshape(-1, len(names)), requested=resamples)


@dataclass
class FitReport:
    """One fit of the table (a curve or an llm's joint fit, within one group) with its intervals,
    or why it was skipped."""

    form: str
    llm: str
    vision: Optional[str]  # curves only
    vision_params: Optional[float]  # curves only; None when the table has no vision_params
    rows: list[FitRow]
    fit: Optional[PowerLawFit] = None
    intervals: dict[str, Optional[tuple[float, float]]] = field(default_factory=dict)
    saturation: Optional[float] = None
    saturation_interval: Optional[tuple[float, float]] = None
    bootstrap_used: int = 0
    skipped: Optional[str] = None
    group: tuple[tuple[str, str], ...] = ()  # the (column, value) pairs that set this curve apart

    @property
    def label(self) -> str:
        """The group as ``column=value, ...`` ('' without groups)."""
        return ", ".join(f"{name}={value}" for name, value in self.group)

    def to_dict(self) -> dict:
        """JSON-ready: parameters, intervals, saturation point, residual per point."""
        out = {"form": self.form, "formula": FORMULAS[self.form], "llm": self.llm}
        if self.group:
            out["group"] = dict(self.group)
        if self.form == CURVE:
            out.update(vision=self.vision, vision_params=_plain(self.vision_params))
        else:
            out["visions"] = list(dict.fromkeys(r.vision for r in sorted(self.rows, key=lambda r: r.vision_params or 0)))
        out["points"] = len(self.rows)
        if self.fit is None:
            out["skipped"] = self.skipped
            return out
        out["params"] = dict(self.fit.params)
        out["ci"] = {k: (list(v) if v is not None else None) for k, v in self.intervals.items()}
        out["rmse_log"] = self.fit.rmse_log
        # JSON has no inf: a saturation point beyond the float range is written as null.
        out["saturation_data_size"] = _finite_or_none(self.saturation)
        out["saturation_ci"] = [_finite_or_none(v) for v in self.saturation_interval] if self.saturation_interval else None
        out["bootstrap_used"] = self.bootstrap_used
        predicted = self.fit.predict(self.fit.data_sizes, self.fit.vision_params)
        out["residuals"] = [
            {"vision": r.vision, "vision_params": _plain(r.vision_params), "data_size": _plain(r.data_size),
             "loss": r.final_eval_loss, "predicted": float(p), "log_residual": res}
            for r, p, res in zip(self.rows, predicted, self.fit.residuals)
        ]
        return out


@dataclass
class ScalingReport:
    """All fits of one results CSV and the options they were made with."""

    curves: list[FitReport]
    joints: list[FitReport]
    epsilon: float
    confidence: float
    resamples: int
    seed: int
    delta: float

    def to_dict(self) -> dict:
        """JSON-ready summary (no NaN/inf: missing values are None)."""
        return {
            "epsilon": self.epsilon,
            "huber_delta": self.delta,
            "bootstrap": {"resamples": self.resamples, "seed": self.seed, "confidence": self.confidence},
            "residual": "log(L_pred) - log(L_obs)",
            "curves": [c.to_dict() for c in self.curves],
            "joint": [j.to_dict() for j in self.joints],
        }

    def format(self) -> str:
        """Human-readable tables: per-curve fits, then joint fits, with intervals."""
        pct = f"{100 * self.confidence:g}%"
        lines = [f"per-curve fits  {FORMULAS[CURVE]}   [{pct} bootstrap CI, {self.resamples} resamples]"]
        grouped = ("group",) if any(r.group for r in self.curves) else ()
        lines += _table(self.curves, ("llm",) + grouped + ("vision", "n"), self.epsilon)
        lines += ["", f"joint fits per llm  {FORMULAS[JOINT]}   (N = vision params)   [{pct} bootstrap CI]"]
        lines += _table(self.joints, ("llm",) + grouped + ("n",), self.epsilon)
        return "\n".join(lines)


def _plain(value: Optional[float]):
    """A whole number as an int (sizes read as floats print as 1000000, not 1000000.0)."""
    return int(value) if value is not None and float(value).is_integer() else value


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def _with_ci(value: float, ci: Optional[tuple[float, float]]) -> str:
    return _num(value) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else " [-]")


def _table(reports: list[FitReport], keys: tuple[str, ...], epsilon: float) -> list[str]:
    """Aligned rows of one table; a skipped fit says why after its label."""
    if not reports:
        return ["  (no fits)"]
    names = PARAM_NAMES[reports[0].form]
    header = list(keys) + list(names) + ["rmse(log)", f"D* (eps={epsilon:g})", "boot"]
    body = []
    for r in reports:
        label = {"llm": r.llm, "group": r.label, "vision": r.vision or "", "n": str(len(r.rows))}
        cells = [label[k] for k in keys]
        if r.fit is None:
            cells.append(f"skipped: {r.skipped}")
        else:
            cells += [_with_ci(r.fit.params[p], r.intervals.get(p)) for p in names]
            cells += [f"{r.fit.rmse_log:.3g}", _with_ci(r.saturation, r.saturation_interval), str(r.bootstrap_used)]
        body.append(cells)
    fitted = [row for row in [header] + body if len(row) == len(header)]
    widths = [max(len(row[i]) for row in fitted) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + body]


def _check_rows(rows: list[FitRow], source: str) -> None:
    """Values a log-space fit cannot use, named by CSV line (header is line 1)."""
    sizes: dict[tuple, Optional[float]] = {}
    for i, r in enumerate(rows):
        where = f"{source} line {i + 2}"
        for name in ("final_eval_loss", "data_size", "vision_params"):
            value = getattr(r, name)
            if value is None and name == "vision_params":
                continue
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{where}: {name} {value!r} must be a positive finite number; fix or delete that row")
        known = sizes.setdefault((r.llm, r.group, r.vision), r.vision_params)
        if known != r.vision_params:
            raise ValueError(
                f"{where}: vision {r.vision!r} has vision_params {_plain(r.vision_params)}, earlier rows say "
                f"{_plain(known)}; one encoder name must have one size"
            )


def _order(rows: list[FitRow]) -> tuple[dict, dict]:
    """Sort keys for LLMs and encoders: by size where the table gives it, else by first appearance
    (smallest LLM first, then encoders by size: the order the study reads its tables in)."""
    llms: dict[str, tuple] = {}
    visions: dict[str, tuple] = {}
    for i, r in enumerate(rows):
        llms.setdefault(r.llm, (r.llm_params if r.llm_params is not None else math.inf, i))
        visions.setdefault(r.vision, (r.vision_params if r.vision_params is not None else math.inf, i))
    return llms, visions


def _plan(rows: list[FitRow]) -> list[FitReport]:
    """One curve per (llm, group, vision) and one joint fit per (llm, group), in reading order."""
    llm_key, vision_key = _order(rows)
    groups = {g: i for i, g in enumerate(dict.fromkeys(r.group for r in rows))}
    by_curve: dict[tuple, list[FitRow]] = {}
    by_joint: dict[tuple, list[FitRow]] = {}
    for r in rows:
        by_curve.setdefault((r.llm, r.group, r.vision), []).append(r)
        by_joint.setdefault((r.llm, r.group), []).append(r)
    curves = [
        FitReport(CURVE, llm, vision, rs[0].vision_params, rs, group=group)
        for (llm, group, vision), rs in sorted(
            by_curve.items(), key=lambda kv: (llm_key[kv[0][0]], kv[0][0], groups[kv[0][1]], vision_key[kv[0][2]])
        )
    ]
    joints = [
        FitReport(JOINT, llm, None, None, rs, group=group)
        for (llm, group), rs in sorted(by_joint.items(), key=lambda kv: (llm_key[kv[0][0]], kv[0][0], groups[kv[0][1]]))
    ]
    return curves + joints


def _skip_reason(report: FitReport) -> Optional[str]:
    """Why a planned fit cannot be made from its rows, or None."""
    if report.form == JOINT and any(r.vision_params is None for r in report.rows):
        return "no vision_params column: the joint fit needs each encoder's parameter count"
    sizes = [r.data_size for r in report.rows]
    encoders = [r.vision_params for r in report.rows] if report.form == JOINT else None
    return _identifiable(report.form, _axes(report.form, sizes, encoders))


def fit_sweep(
    rows: list[Union[FitRow, SweepRow]],
    *,
    epsilon: float = 0.01,
    resamples: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    delta: float = 1e-3,
    source: str = "results",
    progress: Optional[Callable[[int, int], None]] = None,
    workers: int = 1,
) -> ScalingReport:
    """Fit every curve and every joint law of a results table's rows, with bootstrap CIs.

    A curve is one (llm, group, vision); a joint fit one (llm, group) over its encoders, where
    the group is `FitRow.group` (e.g. the data set; sweep rows have none). Each fit's draws use
    their own generator seeded from (``seed``, fit index), so one fit's intervals do not depend on
    others, nor on ``workers``: with more than one, fits run in that many processes (the fits are
    independent and each is pure Python-level optimiser calls, which threads would serialise).
    ``progress(done, total)`` counts bootstrap draws: after each one in a single process, after
    each finished fit with workers. A fit whose points cannot determine its form is reported as
    skipped, with the reason.
    """
    if not rows:
        raise ValueError(f"{source}: no rows to fit")
    if not epsilon > 0:
        raise ValueError(f"saturation epsilon must be > 0, got {epsilon}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    rows = [as_fit_row(r) for r in rows]
    _check_rows(rows, source)
    reports = _plan(rows)
    settings = _FitSettings(epsilon, resamples, seed, confidence, delta)
    total, done = resamples * len(reports), 0

    def tick(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    workers = min(workers, len(reports))
    if workers == 1:
        reports = [_fit_report(report, index, settings, tick) for index, report in enumerate(reports)]
    else:
        # forkserver: children start from a clean process, not a fork of a caller that may hold
        # threads (torch, BLAS) mid-operation; it is also Python 3.14's default on Linux.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(_fit_report, report, index, settings): index for index, report in enumerate(reports)}
            for future in as_completed(futures):
                reports[futures[future]] = future.result()
                tick(resamples)
    curves = [r for r in reports if r.form == CURVE]
    joints = [r for r in reports if r.form == JOINT]
    return ScalingReport(curves, joints, epsilon, confidence, resamples, seed, delta)


@dataclass(frozen=True)
class _FitSettings:
    """What every fit of a table shares (sent to worker processes with each fit)."""

    epsilon: float
    resamples: int
    seed: int
    confidence: float
    delta: float


def _fit_report(report: FitReport, index: int, settings: _FitSettings,
                tick: Optional[Callable[..., None]] = None) -> FitReport:
    """``report`` with its fit, bootstrap intervals and saturation point filled in (or why it was
    skipped); ``tick()`` after each bootstrap draw (``tick(resamples)`` at once for a skipped fit). Module-level so that worker processes can run it."""
    report.skipped = _skip_reason(report)
    if report.skipped is None:
        try:
            report.fit = fit_power_law(
                report.form, [r.data_size for r in report.rows], [r.final_eval_loss for r in report.rows],
                [r.vision_params for r in report.rows] if report.form == JOINT else None, delta=settings.delta,
            )
        except ValueError as err:  # diverged from every start
            report.skipped = str(err)
    if report.fit is None:
        if tick is not None:
            tick(settings.resamples)
        return report
    boot = bootstrap(report.fit, settings.resamples, seed=(settings.seed, index), delta=settings.delta, progress=tick)
    report.intervals = boot.intervals(settings.confidence)
    report.saturation = report.fit.saturation_data_size(settings.epsilon)
    report.saturation_interval = boot.saturation_interval(settings.epsilon, settings.confidence)
    report.bootstrap_used = boot.used
    return report


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one, as on Linux), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_output(csv_path, suffix: str) -> Path:
    """``<csv folder>/<csv stem>_fit<suffix>``: where the tool writes its PNG and JSON by default."""
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}_fit{suffix}")


__all__ = [
    "CURVE", "JOINT", "PARAM_NAMES", "FORMULAS", "PowerLawFit", "predict", "saturation_data_size",
    "fit_power_law", "fit_curve", "fit_joint", "Bootstrap", "bootstrap", "FitReport", "ScalingReport",
    "fit_sweep", "available_cpus", "default_output",
]

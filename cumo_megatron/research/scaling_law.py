"""Power-law fits of the scaling sweep's final losses, with bootstrap intervals and saturation points.

Two forms, fitted the way Hoffmann et al. (2022, "Chinchilla", approach 3) fit theirs:

- per (vision, llm) curve: ``L(D) = E + B / D^beta`` (D = training samples);
- per llm, jointly over its encoders: ``L(N, D) = E + A / N^alpha + B / D^beta`` (N = vision parameters).

The objective is ``sum Huber_delta(log L_pred - log L_obs)`` (delta ~1e-3: nearly an L1 fit in log
space, so one bad cell cannot drag the curve), minimised by L-BFGS in float64 from the best points
of a grid of starts. Positive parameters are optimised through their logs and the prediction is a
log-sum-exp of the terms, so the search is unconstrained and never takes the log of a negative.
Exponents (alpha, beta) are free, as in Hoffmann et al.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from cumo_megatron.research.results_csv import SweepRow

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


def _log_predict(theta: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """log L for each start: ``theta`` [S, 1 + 2k], ``coords`` [k, n] (log of normalised axes) -> [S, n]."""
    return torch.logsumexp(_terms(theta, coords), dim=0)


def _terms(theta: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The log of each additive term, [1 + k, S, n]: ``e`` and, per axis j, ``c_j - p_j * coord_j``."""
    terms = [theta[:, :1].expand(-1, coords.shape[1])]
    for j in range(coords.shape[0]):
        coef, power = theta[:, 1 + 2 * j: 2 + 2 * j], theta[:, 2 + 2 * j: 3 + 2 * j]
        terms.append(coef - power * coords[j])
    return torch.stack(terms)


def _objective(theta: torch.Tensor, coords: torch.Tensor, log_obs: torch.Tensor, delta: float):
    """Summed Huber loss of the log residuals per start, divided by delta, and its gradient: [S], [S, p].

    Dividing by delta keeps the argmin and makes gradients O(1), so L-BFGS's tolerances mean the
    same whatever delta is. The gradient is written out because autograd's bookkeeping cost more
    than the arithmetic on these few numbers: with ``w`` the softmax of the terms and ``psi`` the
    Huber derivative, d/de = sum psi w_0, d/dc_j = sum psi w_j, d/dp_j = -sum psi w_j coord_j.
    """
    terms = _terms(theta, coords)
    log_pred = torch.logsumexp(terms, dim=0)
    residual = log_pred - log_obs
    small = residual.abs() < delta
    value = torch.where(small, 0.5 * residual**2 / delta, residual.abs() - 0.5 * delta).sum(dim=-1)
    psi = residual.clamp(-delta, delta) / delta
    weighted = psi * torch.exp(terms - log_pred)  # [1 + k, S, n]
    grads = [weighted[0].sum(dim=-1)]
    for j in range(coords.shape[0]):
        grads += [weighted[1 + j].sum(dim=-1), -(weighted[1 + j] * coords[j]).sum(dim=-1)]
    return value, torch.stack(grads, dim=-1)


def _grid(n_axes: int, min_loss: float) -> torch.Tensor:
    """All grid starts as optimiser vectors, [S, 1 + 2 * n_axes]."""
    e = [math.log(min_loss * f) for f in _E_FRACTIONS]
    coef = [math.log(min_loss * f) for f in _COEF_FRACTIONS]
    per_axis = list(itertools.product(coef, _EXPONENTS))
    rows = [(ev,) + sum(axes, ()) for ev in e for axes in itertools.product(per_axis, repeat=n_axes)]
    return torch.tensor(rows, dtype=torch.float64)


def _lbfgs(start: torch.Tensor, coords, log_obs, delta: float, max_iter: int, tolerance: float) -> tuple[torch.Tensor, float]:
    """Minimise from one start; the end point and its objective (inf when it diverged).

    Stops when an iteration changes the objective (or a parameter) by less than ``tolerance``.
    """
    theta = start.clone().unsqueeze(0).requires_grad_(True)
    # A history longer than a few steps buys nothing with 3-5 parameters and costs time per step.
    opt = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=tolerance,
        history_size=8, line_search_fn="strong_wolfe",
    )

    def closure():
        with torch.no_grad():
            value, grad = _objective(theta, coords, log_obs, delta)
        theta.grad = grad
        return value.sum()

    opt.step(closure)
    with torch.no_grad():
        value = float(_objective(theta, coords, log_obs, delta)[0])
    if not math.isfinite(value) or not torch.isfinite(theta).all():
        return theta.detach()[0], math.inf
    return theta.detach()[0], value


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


def fit_power_law(
    form: str,
    data_sizes: Sequence[float],
    losses: Sequence[float],
    vision_params: Optional[Sequence[float]] = None,
    *,
    delta: float = 1e-3,
    starts: int = 8,
    max_iter: int = 500,
    tolerance: float = 1e-10,
    scales: Optional[Sequence[float]] = None,
    extra_starts: Sequence[Sequence[float]] = (),
) -> PowerLawFit:
    """Fit ``form`` (`CURVE` or `JOINT`) to the points; the best of L-BFGS runs from several starts.

    The whole start grid is scored at once and L-BFGS runs from its ``starts`` best points plus
    ``extra_starts`` (optimiser vectors at ``scales``; bootstrap refits pass the full fit's).
    ``scales`` divide the axes before the log (default: their geometric means) so that the
    coefficients' logs and the exponents are of order one. Raises ``ValueError`` for points that
    cannot determine the form (non-positive values, too few distinct sizes).
    """
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
    coords = torch.from_numpy(np.log(axes / np.asarray(scales)[:, None]))
    log_obs = torch.from_numpy(np.log(obs))

    grid = _grid(len(axes), float(obs.min()))
    with torch.no_grad():
        scores = _objective(grid, coords, log_obs, delta)[0]
    candidates = list(grid[torch.argsort(scores)[:starts]])
    candidates += [torch.as_tensor(s, dtype=torch.float64) for s in extra_starts]
    best_theta, best_value = None, math.inf
    for start in candidates:
        theta, value = _lbfgs(start, coords, log_obs, delta, max_iter, tolerance)
        if value < best_value:
            best_theta, best_value = theta, value
    if best_theta is None:
        raise ValueError(f"power-law fit ({FORMULAS[form]}): every start diverged")

    params = _to_params(form, best_theta.numpy(), scales)
    if not all(math.isfinite(v) for v in params.values()):
        raise ValueError(f"power-law fit ({FORMULAS[form]}): parameters overflowed ({params})")
    with torch.no_grad():
        residuals = (_log_predict(best_theta[None], coords)[0] - log_obs).numpy()
    return PowerLawFit(
        form=form,
        params=params,
        data_sizes=tuple(float(v) for v in axes[-1]),
        vision_params=tuple(float(v) for v in axes[0]) if form == JOINT else None,
        losses=tuple(float(v) for v in obs),
        residuals=tuple(float(v) for v in residuals),
        objective=best_value,
        theta=tuple(float(v) for v in best_theta),
        scales=tuple(float(s) for s in scales),
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
    tolerance: float = 1e-6,
    progress: Optional[Callable[[], None]] = None,
) -> Bootstrap:
    """Refit ``fit``'s form on ``resamples`` draws of its points with replacement.

    Each refit starts from the full fit's solution and the ``starts`` best grid points of the
    resample. Draws that cannot determine the form (too few distinct sizes) are skipped and
    counted out of `Bootstrap.used`. ``progress()`` is called once per draw. The refits stop at a
    looser ``tolerance`` than a fit (the objective is a sum of |log residual| / delta, so 1e-6 is
    1e-9 in log loss): on draws that leave the form nearly undetermined the optimiser otherwise
    crawls along a flat valley for hundreds of steps, and where it stops there moves the
    parameters far less than the draws scatter.
    """
    rng = np.random.default_rng(seed)
    n = len(fit.losses)
    losses = np.asarray(fit.losses)
    d = np.asarray(fit.data_sizes)
    vp = None if fit.vision_params is None else np.asarray(fit.vision_params)
    samples = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        try:
            refit = fit_power_law(
                fit.form, d[idx], losses[idx], None if vp is None else vp[idx], delta=delta, starts=starts,
                max_iter=max_iter, tolerance=tolerance, scales=fit.scales, extra_starts=[fit.theta],
            )
        except ValueError:
            refit = None
        if refit is not None:
            samples.append([refit.params[name] for name in PARAM_NAMES[fit.form]])
        if progress is not None:
            progress()
    names = PARAM_NAMES[fit.form]
    return Bootstrap(names=names, samples=np.asarray(samples, dtype=np.float64).reshape(-1, len(names)), requested=resamples)


@dataclass
class FitReport:
    """One fit of the sweep (a curve or an llm's joint fit) with its intervals, or why it was skipped."""

    form: str
    llm: str
    vision: Optional[str]  # curves only
    vision_params: Optional[int]  # curves only
    rows: list[SweepRow]
    fit: Optional[PowerLawFit] = None
    intervals: dict[str, Optional[tuple[float, float]]] = field(default_factory=dict)
    saturation: Optional[float] = None
    saturation_interval: Optional[tuple[float, float]] = None
    bootstrap_used: int = 0
    skipped: Optional[str] = None

    def to_dict(self) -> dict:
        """JSON-ready: parameters, intervals, saturation point, residual per point."""
        out = {"form": self.form, "formula": FORMULAS[self.form], "llm": self.llm}
        if self.form == CURVE:
            out.update(vision=self.vision, vision_params=self.vision_params)
        else:
            out["visions"] = list(dict.fromkeys(r.vision for r in sorted(self.rows, key=lambda r: r.vision_params)))
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
            {"vision": r.vision, "vision_params": r.vision_params, "data_size": r.data_size,
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
        lines += _table(self.curves, ("llm", "vision", "n"), self.epsilon)
        lines += ["", f"joint fits per llm  {FORMULAS[JOINT]}   (N = vision params)   [{pct} bootstrap CI]"]
        lines += _table(self.joints, ("llm", "n"), self.epsilon)
        return "\n".join(lines)


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
        label = {"llm": r.llm, "vision": r.vision or "", "n": str(len(r.rows))}
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


def _check_rows(rows: list[SweepRow], source: str) -> None:
    """Values a log-space fit cannot use, named by CSV line (header is line 1)."""
    sizes: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        where = f"{source} line {i + 2}"
        for name in ("final_eval_loss", "data_size", "vision_params"):
            value = getattr(r, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{where}: {name} {value!r} must be a positive finite number; fix or delete that row")
        known = sizes.setdefault((r.llm, r.vision), r.vision_params)
        if known != r.vision_params:
            raise ValueError(
                f"{where}: vision {r.vision!r} has vision_params {r.vision_params}, earlier rows say {known}; "
                "one encoder name must have one size"
            )


def fit_sweep(
    rows: list[SweepRow],
    *,
    epsilon: float = 0.01,
    resamples: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    delta: float = 1e-3,
    source: str = "results",
    progress: Optional[Callable[[int, int], None]] = None,
) -> ScalingReport:
    """Fit every (vision, llm) curve and every llm's joint law of a sweep's rows, with bootstrap CIs.

    ``progress(done, total)`` is called after each bootstrap draw. Each fit's draws use their own
    generator seeded from (``seed``, fit index), so one fit's intervals do not depend on others.
    A fit whose points cannot determine its form is reported as skipped, with the reason.
    """
    if not rows:
        raise ValueError(f"{source}: no rows to fit")
    if not epsilon > 0:
        raise ValueError(f"saturation epsilon must be > 0, got {epsilon}")
    _check_rows(rows, source)
    by_curve: dict[tuple[str, str], list[SweepRow]] = {}
    by_llm: dict[str, list[SweepRow]] = {}
    for r in rows:
        by_curve.setdefault((r.llm, r.vision), []).append(r)
        by_llm.setdefault(r.llm, []).append(r)
    # Smallest LLM first, then encoders by size: the order the study reads its tables in.
    llm_order = {llm: (group[0].llm_params, llm) for llm, group in by_llm.items()}
    curves = [
        FitReport(CURVE, llm, vision, group[0].vision_params, group)
        for (llm, vision), group in sorted(
            by_curve.items(), key=lambda kv: (llm_order[kv[0][0]], kv[1][0].vision_params, kv[0][1])
        )
    ]
    joints = [FitReport(JOINT, llm, None, None, by_llm[llm]) for llm in sorted(by_llm, key=llm_order.get)]

    reports = curves + joints
    total, done = resamples * len(reports), 0
    for index, report in enumerate(reports):
        sizes = [r.data_size for r in report.rows]
        encoders = [r.vision_params for r in report.rows] if report.form == JOINT else None
        report.skipped = _identifiable(report.form, _axes(report.form, sizes, encoders))
        if report.skipped is None:
            try:
                report.fit = fit_power_law(
                    report.form, sizes, [r.final_eval_loss for r in report.rows], encoders, delta=delta
                )
            except ValueError as err:  # diverged from every start
                report.skipped = str(err)
        if report.fit is None:
            done += resamples
            if progress is not None:
                progress(done, total)
            continue

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        boot = bootstrap(report.fit, resamples, seed=(seed, index), delta=delta, progress=tick)
        report.intervals = boot.intervals(confidence)
        report.saturation = report.fit.saturation_data_size(epsilon)
        report.saturation_interval = boot.saturation_interval(epsilon, confidence)
        report.bootstrap_used = boot.used
    return ScalingReport(curves, joints, epsilon, confidence, resamples, seed, delta)


def default_output(csv_path, suffix: str) -> Path:
    """``<csv folder>/<csv stem>_fit<suffix>``: where the tool writes its PNG and JSON by default."""
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}_fit{suffix}")


__all__ = [
    "CURVE", "JOINT", "PARAM_NAMES", "FORMULAS", "PowerLawFit", "predict", "saturation_data_size",
    "fit_power_law", "fit_curve", "fit_joint", "Bootstrap", "bootstrap", "FitReport", "ScalingReport",
    "fit_sweep", "default_output",
]

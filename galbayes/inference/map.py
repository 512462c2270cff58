"""Batched MAP: numpyro SVI (point-mass guide, optax optimizer), then a Levenberg–Marquardt polish.

Everything here is written for ONE galaxy and batched with ``jax.vmap`` inside one jitted
program; a batch runs without host round-trips per iteration. Per-galaxy early stopping
comes for free: under ``vmap`` a ``lax.while_loop`` keeps iterating only the galaxies whose
condition is still true, so a converged galaxy's state no longer changes and its
iteration count is its own.

Which point is the MAP
----------------------
Both likelihoods depend on the parameters only through χ². The Gaussian one is maximised
at the χ² minimum. The χ²-distribution one (eq. 17) is maximised wherever χ² = k − 2; when
the best fit has χ²_min < k − 2 (about half of well-modelled galaxies with correct σ) those
maxima are a whole shell around the χ² minimum, and even when χ²_min > k − 2 its gradient is
the χ² gradient scaled by (1 − (k−2)/χ²), nearly zero near a good fit, which stalls
gradient descent (the paper's early-stopping bias). galbayes therefore defines the MAP point
of either likelihood as the χ² minimum (with the priors): both stages optimise the
Gaussian-likelihood posterior, which with the default flat priors is exactly
``argmin χ²`` within the bounds, and the chosen likelihood is only *reported* there.

Stages
------
1. SVI: ``numpyro.infer.SVI`` with ``AutoDelta`` (MAP semantics: density in the sampled
   coordinates, no Jacobian) and an optax optimizer (Adam by default), stopping a galaxy
   when its loss has not improved by ``ftol`` for ``patience`` steps.
2. Polish (default ``"lm"``): Levenberg–Marquardt on the whitened residuals in the
   guide's unconstrained coordinates, with the Jacobian from ``jax.jacfwd`` (one forward
   pass per free parameter); a galaxy has converged when the undamped Gauss–Newton step
   predicts a gain below ``lm_ftol`` in χ²/2 (see :func:`_lm_stage`). From the SVI start it
   typically needs 5–20 steps and lands on the χ² minimum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta
from numpyro.infer.initialization import init_to_value
from numpyro.infer.util import constrain_fn, log_density, unconstrain_fn

from ..devices import data_parallel, place_batch
from ..model import GalaxyArrays, Model

__all__ = ["MapOptions", "MapResult", "fit_map", "OPTIMIZERS"]

OPTIMIZERS = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "adabelief": optax.adabelief,
    "nadam": optax.nadam,
    "sgd": lambda lr: optax.sgd(lr, momentum=0.9),
}


@dataclass(frozen=True)
class MapOptions:
    """Settings of :func:`fit_map` (all keyword-only, hashable).

    Parameters
    ----------
    optimizer : str
        optax optimizer for the SVI stage: one of :data:`OPTIMIZERS`.
    learning_rate : float
        Its step size in the unconstrained coordinates.
    max_iter : int
        Cap on SVI steps per galaxy (0 skips SVI).
    patience, ftol : int, float
        SVI stops a galaxy after ``patience`` steps without a loss gain > ``ftol``.
    polish : {"lm", "none"}
        Second-order polish after SVI.
    lm_iter : int
        Cap on Levenberg–Marquardt steps.
    lm_ftol : float
        LM has converged when the undamped Gauss–Newton step predicts a gain below this in
        χ²/2 (i.e. χ² is within 2·lm_ftol of the minimum of its quadratic model).
    seed : int
        Random seed (SVI's key; the point-mass guide uses no randomness).
    """

    optimizer: str = "adam"
    learning_rate: float = 0.02
    max_iter: int = 25
    patience: int = 5
    ftol: float = 0.05
    polish: str = "lm"
    lm_iter: int = 50
    lm_ftol: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.polish not in ("lm", "none"):
            raise ValueError(f"polish must be 'lm' or 'none', got {self.polish!r}")
        if self.max_iter < 0 or self.lm_iter < 0:
            raise ValueError("iteration caps must be >= 0")
        if self.max_iter == 0 and self.polish == "none":
            raise ValueError("max_iter=0 with polish='none' would not fit anything")


class MapResult(NamedTuple):
    """Per-galaxy MAP results (leading axis = galaxy)."""

    values: np.ndarray     # (B, E) every entry in user units (angles wrapped)
    chi2: np.ndarray       # (B,)
    loglike: np.ndarray    # (B,) of the model's likelihood at the MAP
    n_iter: np.ndarray     # (B,) SVI steps + LM steps
    converged: np.ndarray  # (B,) bool
    n_svi: np.ndarray      # (B,)
    n_lm: np.ndarray       # (B,)


# --------------------------------------------------------------------------- one galaxy
def _svi_stage(model: Model, gal: GalaxyArrays, key, opts: MapOptions):
    """SVI with a point-mass guide from ``gal.values0``; returns (unconstrained z, steps)."""
    init_sites = model.site_values(gal.values0, gal)
    guide = AutoDelta(model.numpyro_model, init_loc_fn=init_to_value(values=init_sites))
    optim = numpyro.optim.optax_to_numpyro(OPTIMIZERS[opts.optimizer](opts.learning_rate))
    svi = SVI(model.numpyro_model, guide, optim, Trace_ELBO())
    state = svi.init(key, gal, likelihood="gaussian")
    loss0 = svi.evaluate(state, gal, likelihood="gaussian")

    def cond(c):
        _, it, _, since = c
        return (it < opts.max_iter) & (since < opts.patience)

    def body(c):
        state, it, best, since = c
        state, loss = svi.update(state, gal, likelihood="gaussian")
        improved = loss < best - opts.ftol
        return state, it + 1, jnp.minimum(best, loss), jnp.where(improved, 0, since + 1)

    state, it, _, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0), loss0, jnp.int32(0)))
    params = svi.get_params(state)
    sites = {k[: -len("_auto_loc")]: v for k, v in params.items()}
    z = unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, sites)
    return z, it


def _objective_parts(model: Model, gal: GalaxyArrays):
    """Residual function r(z) and negative log prior p(z) of unconstrained sites z."""

    def constrained(z):
        return constrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, z)

    def residuals(z):
        return model.residuals(model.values_from_sites(constrained(z), gal), gal)

    def neg_log_prior(z):
        lp, _ = log_density(model.numpyro_model, (gal,), {"likelihood": "none"}, constrained(z))
        return -lp

    return constrained, residuals, neg_log_prior


_FLIP_Q = 0.97          # restart axis ratio after a fit ended on q = 1 (see _axis_flip)


def _axis_flip(model: Model, gal: GalaxyArrays, values):
    """Values with every ellipse that ended on its upper axis-ratio bound q = 1 turned by
    90° and started again at q = 0.97, and whether any was.

    q ≤ 1 is a convention, not physics: an ellipse (q, pa) equals (1/q, pa ± 90°), so when the
    data want q slightly above 1 the fit stops on the bound with an arbitrary pa; the minimum
    it is looking for lies at q < 1 and pa + 90°. Only bounds that reach 1 (a user's upper
    bound below 1 is deliberate) and angles free over a full 180° are turned.
    """
    need = jnp.bool_(False)
    for jq, jpa in model.axis_ratio_pairs:
        iq, ipa = model.free[jq], model.free[jpa]
        lo_q, hi_q, lo_a, hi_a = gal.lo[jq], gal.hi[jq], gal.lo[jpa], gal.hi[jpa]
        on_bound = (hi_q >= 0.999) & (values[iq] > hi_q - 2e-3 * (hi_q - lo_q)) & (hi_a - lo_a >= 179.9)
        mid = 0.5 * (lo_a + hi_a)
        pa = mid + jnp.mod(values[ipa] + 90.0 - mid + 90.0, 180.0) - 90.0   # nearest the middle
        pa = jnp.clip(pa, lo_a + 1e-4 * (hi_a - lo_a), hi_a - 1e-4 * (hi_a - lo_a))
        q = jnp.clip(_FLIP_Q, lo_q + 1e-3 * (hi_q - lo_q), hi_q)
        values = jnp.where(on_bound, values.at[iq].set(q).at[ipa].set(pa), values)
        need = need | on_bound
    return values, need


def _lm_stage(model: Model, gal: GalaxyArrays, z0: dict, opts: MapOptions):
    """Levenberg–Marquardt on ½‖r(z)‖² + (−log prior) in unconstrained coordinates.

    Stopping rule: the galaxy is *converged* when the undamped Gauss–Newton step at the
    current point predicts a gain below ``lm_ftol`` in χ²/2 (half the Newton decrement
    ``gᵀH⁻¹g``, with H lightly regularised by 1e-6 of its diagonal): a test of the gradient in
    the metric of the curvature, scale-free and immune to float32 rounding of χ² itself. A
    small accepted step is *not* a stopping signal (at large damping a step can be tiny far
    from the minimum). Gains of trial steps are summed pixel by pixel as
    ½Σ(r−r')(r+r'), so they are exact to float32 precision even when χ²/2 ~ 1e4 and the gain
    ~ 1e-4. The damping follows Nielsen's rule (gain ratio ρ: λ·max(1/3, 1 − (2ρ−1)³) on
    success, λ·ν with ν doubling on failure). The loop also ends, *unconverged*, at ``lm_iter``
    steps or when a step fails at damping 1e7 (a point where even a scaled gradient step
    of relative size 1e-7 does not descend).

    A galaxy that stops with an ellipse on q = 1 is restarted once from q = 0.97 at pa + 90°
    (:func:`_axis_flip`), in the same loop and iteration budget; the better of the two ends
    (by the objective) is kept.
    """
    constrained, residuals, neg_log_prior = _objective_parts(model, gal)
    flat0, unravel = jax.flatten_util.ravel_pytree(z0)

    def res(x):
        return residuals(unravel(x))

    def prior(x):
        return neg_log_prior(unravel(x))

    def flipped(x):
        values = model.values_from_sites(constrained(unravel(x)), gal)
        values, need = _axis_flip(model, gal, values)
        z = unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, model.site_values(values, gal))
        return jax.flatten_util.ravel_pytree(z)[0], need

    n = flat0.shape[0]
    eye = jnp.eye(n)
    can_flip = bool(model.axis_ratio_pairs)

    def cond(c):
        return (c[3] < opts.lm_iter) & ~c[5]

    def body(c):
        x, lam, nu, it, _, _, phase, x_keep, f_keep, conv_keep = c
        r = res(x)
        jac = jax.jacfwd(res)(x)
        p0 = prior(x)
        grad = jac.T @ r + jax.grad(prior)(x)
        hess = jac.T @ jac + jax.hessian(prior)(x)
        diag = jnp.maximum(jnp.diag(hess), 1e-12)
        # predicted gain of the (almost) undamped Gauss–Newton step
        gn = jnp.linalg.solve(hess + 1e-6 * jnp.diag(diag), grad)
        decrement = 0.5 * jnp.dot(grad, gn)
        at_min = jnp.isfinite(decrement) & (decrement < opts.lm_ftol)
        step = jnp.linalg.solve(hess + lam * jnp.diag(diag) + 1e-12 * eye, -grad)
        step = jnp.where(jnp.all(jnp.isfinite(step)), step, jnp.zeros_like(step))
        x_new = x + step
        r_new = res(x_new)
        gain = -(0.5 * jnp.sum((r_new - r) * (r_new + r)) + (prior(x_new) - p0))
        predicted = -(jnp.dot(grad, step) + 0.5 * step @ hess @ step)
        rho = gain / jnp.maximum(predicted, 1e-30)
        accept = ~at_min & jnp.isfinite(gain) & (gain > 0)
        x = jnp.where(accept, x_new, x)
        f = 0.5 * jnp.sum(r * r) + p0 - jnp.where(accept, gain, 0.0)
        lam_ok = lam * jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * jnp.clip(rho, 0.0, 1.0) - 1.0) ** 3)
        lam = jnp.clip(jnp.where(accept, lam_ok, lam * nu), 1e-9, 1e8)
        nu = jnp.where(accept, 2.0, nu * 2.0)
        stuck = ~at_min & ~accept & (lam >= 1e7)
        done = at_min | stuck
        if can_flip:
            x_alt, need = flipped(x)
            restart = done & (phase == 0) & need
            x_keep = jnp.where(restart, x, x_keep)
            f_keep = jnp.where(restart, f, f_keep)
            conv_keep = jnp.where(restart, at_min, conv_keep)
            x = jnp.where(restart, x_alt, x)
            lam = jnp.where(restart, 1e-3, lam)
            nu = jnp.where(restart, 2.0, nu)
            phase = jnp.where(restart, 1, phase)
            done = done & ~restart
        return x, lam, nu, it + 1, at_min, done, phase, x_keep, f_keep, conv_keep

    init = (flat0, jnp.float32(1e-3), jnp.float32(2.0), jnp.int32(0), jnp.bool_(False), jnp.bool_(False),
            jnp.int32(0), flat0, jnp.float32(jnp.inf), jnp.bool_(False))
    x, _, _, it, converged, _, phase, x_keep, f_keep, conv_keep = jax.lax.while_loop(cond, body, init)
    if can_flip:
        r = res(x)
        better = (0.5 * jnp.sum(r * r) + prior(x)) < f_keep     # f_keep = inf unless restarted
        x = jnp.where(better, x, x_keep)
        converged = jnp.where(better, converged, conv_keep)
    return unravel(x), it, converged


def _fit_one(model: Model, opts: MapOptions, gal: GalaxyArrays, key):
    if opts.max_iter > 0:
        z, n_svi = _svi_stage(model, gal, key, opts)
    else:
        z = unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"},
                           model.site_values(gal.values0, gal))
        n_svi = jnp.int32(0)
    if opts.polish == "lm":
        z, n_lm, done = _lm_stage(model, gal, z, opts)
    else:
        n_lm, done = jnp.int32(0), n_svi < opts.max_iter
    sites = constrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, z)
    values = model.values_from_sites(sites, gal)
    # float32 rounding of the bijection can land on, or one ulp beyond, a bound; keep the
    # MAP strictly inside so that refits (bootstrap), Laplace and NUTS can start from it.
    free = jnp.asarray(model.free)
    margin = 1e-6 * (gal.hi - gal.lo)
    values = values.at[free].set(jnp.clip(values[free], gal.lo + margin, gal.hi - margin))
    c2 = model.chi2(values, gal)
    return values, c2, model.loglike_from_chi2(c2, gal), n_svi, n_lm, done


_COMPILED: dict = {}


def _compiled(model: Model, opts: MapOptions):
    key = (id(model), opts)
    if key not in _COMPILED:
        _COMPILED[key] = (model, jax.jit(jax.vmap(lambda g, k: _fit_one(model, opts, g, k))))
    return _COMPILED[key][1]


def fit_map(model: Model, batch: GalaxyArrays, *, options: MapOptions | None = None, **kwargs) -> MapResult:
    """Fit a batch of galaxies: SVI + optax, then LM polish, in one jitted program.

    Parameters
    ----------
    model : Model
        The model.
    batch : GalaxyArrays
        Stacked galaxies (:meth:`Model.stack` of :meth:`Model.pack` outputs).
    options : MapOptions, optional
        Settings; keyword arguments override its fields.

    Returns
    -------
    MapResult
    """
    opts = options or MapOptions()
    if kwargs:
        opts = MapOptions(**{**opts.__dict__, **kwargs})
    n = np.shape(batch.image)[0]
    keys = jax.random.split(jax.random.PRNGKey(opts.seed), n)
    # Under galbayes.devices.use_devices(): padded to a multiple of the device count and
    # split over the galaxy axis (sharded inputs are kept); else plain device arrays.
    batch, keys, n = place_batch(batch, keys)
    out = data_parallel(_compiled(model, opts))(batch, keys)
    values, c2, ll, n_svi, n_lm, done = (np.asarray(a)[:n] for a in out)
    values = np.asarray(values, dtype=np.float64)
    finite = np.all(np.isfinite(values), axis=1) & np.isfinite(np.asarray(c2))
    return MapResult(
        values=model.wrap_angles(values),
        chi2=np.asarray(c2, dtype=np.float64),
        loglike=np.asarray(ll, dtype=np.float64),
        n_iter=np.asarray(n_svi + n_lm),
        converged=np.asarray(done) & finite,
        n_svi=np.asarray(n_svi),
        n_lm=np.asarray(n_lm),
    )

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
1. SVI: ``numpyro.infer.SVI`` with a point-mass guide (``AutoDelta``'s, built without its
   prototype run: :func:`_point_guide`; MAP semantics: density in the sampled coordinates, no
   Jacobian) and an optax optimizer (Adam by default), stopping a galaxy
   when its loss has not improved by ``ftol`` for ``patience`` steps.
2. Polish (default ``"lm"``): Levenberg–Marquardt on the whitened residuals in the
   guide's unconstrained coordinates, with the Jacobian from ``jax.jacfwd`` (one forward
   pass per free parameter); a galaxy has converged when the undamped Gauss–Newton step
   predicts a gain below ``lm_ftol`` in χ²/2 (see :func:`_lm_stage`). Steps are capped in
   the unconstrained coordinates, angles are kept in the middle of their bounds, and a fit
   that ends on q = 1 is restarted at pa + 90°. From the SVI start it typically needs 3–20
   steps and lands on the χ² minimum (``benchmarks/bench_convergence.py``: 64 mocks with
   perturbed starts all within 0.004 of an independent float64 least-squares minimum).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Trace_ELBO
import numpyro.distributions as dist
from numpyro.handlers import replay, seed
from numpyro.infer.util import compute_log_probs, constrain_fn, log_density, unconstrain_fn

from ..compiled import compiled
from ..errors import OptionsError
from ..model import GalaxyArrays, Model, describe_model, galbayes_code_only
from ..params import wrap_angle
from ..traced import TracedProgram, canon

__all__ = ["MapOptions", "MapResult", "fit_map", "precompile", "OPTIMIZERS", "POLISH_METHODS", "ROUND_ITER"]

OPTIMIZERS = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "adabelief": optax.adabelief,
    "nadam": optax.nadam,
    "sgd": lambda lr: optax.sgd(lr, momentum=0.9),
}

#: Second-order polish after SVI (:attr:`MapOptions.polish`).
POLISH_METHODS = ("lm", "none")


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
        Cap on SVI steps per galaxy (0 skips SVI). The default, 10, makes SVI a short warm-up
        before the LM, which does the rest. Measured with caps 25, 10, 6 and 0 on 128 GalSim
        mocks, each from its given and its automatic start: every fit ended within 0.01 of the
        lowest χ² of the four; a cap of 10 fitted 1.4× faster than 25 (SVI steps took most of
        the fitting time). On the three shipped SDSS galaxies a cap of 10 ended within 0.1 of
        the lowest χ² in all six fits, 25 in five (the bulge + disk galaxy from its automatic
        start stopped 437 higher, in another local minimum). A larger cap can still help
        where SVI's small steps keep a fit out of a local minimum the LM would reach.
    patience, ftol : int, float
        SVI stops a galaxy after ``patience`` steps without a loss gain > ``ftol``.
    polish : {"lm", "none"}
        Second-order polish after SVI.
    lm_iter : int
        Cap on Levenberg–Marquardt steps (default 100). Most fits need 3–20; a few galaxies
        with a long, narrow χ² valley (small, high-n, flat ones) need ~50 (one of 256 mocks in
        benchmarks/bench_throughput.py: 52 steps). A galaxy only iterates as long as it needs,
        and a finished one hands its slot on, so a higher cap costs only those galaxies' time.
    lm_ftol : float
        LM has converged when the undamped Gauss–Newton step predicts a gain below this in
        χ²/2 (i.e. χ² is within 2·lm_ftol of the minimum of its quadratic model).
    seed : int
        Random seed (SVI's key; the point-mass guide uses no randomness).
    """

    optimizer: str = "adam"
    learning_rate: float = 0.02
    max_iter: int = 10
    patience: int = 5
    ftol: float = 0.05
    polish: str = "lm"
    lm_iter: int = 100
    lm_ftol: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise OptionsError(f"unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.polish not in POLISH_METHODS:
            raise OptionsError(f"polish must be 'lm' or 'none', got {self.polish!r}")
        if self.max_iter < 0 or self.lm_iter < 0:
            raise OptionsError("iteration caps must be >= 0")
        if self.max_iter == 0 and self.polish == "none":
            raise OptionsError("max_iter=0 with polish='none' would not fit anything")


class MapResult(NamedTuple):
    """Per-galaxy MAP results (leading axis = galaxy)."""

    values: np.ndarray     # (B, E) every entry in user units (angles wrapped)
    chi2: np.ndarray       # (B,)
    loglike: np.ndarray    # (B,) of the model's likelihood at the MAP
    n_iter: np.ndarray     # (B,) SVI steps + LM steps
    converged: np.ndarray  # (B,) bool
    n_svi: np.ndarray      # (B,)
    n_lm: np.ndarray       # (B,)
    #: (B, S) the final point in numpyro's unconstrained coordinates (flattened sample sites
    #: in sorted name order), where the LM evaluated ``gauss_newton``
    unconstrained: np.ndarray | None = None
    #: (B, S, S) JᵀJ of the whitened residuals w.r.t. those coordinates at that point (the
    #: LM's last Jacobian; NaN without the LM polish). laplace_errors reuses it.
    gauss_newton: np.ndarray | None = None
    #: (B, ny, nx) model images at the MAP (``fit_map(..., render=True)``), else None
    images: np.ndarray | None = None
    #: {component: (B, ny, nx)} each component's image as it enters the model, or None
    components: dict | None = None


# --------------------------------------------------------------------------- one galaxy
class _SortedTraceELBO(Trace_ELBO):
    """numpyro's single-particle Trace_ELBO with the per-site terms summed in sorted site
    order. numpyro sums them over a Python ``set`` of names, whose order — and so the traced
    program, its float rounding and its persistent-cache key — changes with
    ``PYTHONHASHSEED``; here the program is the same in every process."""

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        model_seed, guide_seed = jax.random.split(rng_key)
        guide_lp, guide_trace = compute_log_probs(seed(guide, guide_seed), args, kwargs, param_map)
        model_lp, _ = compute_log_probs(replay(seed(model, model_seed), guide_trace), args, kwargs, param_map)
        elbo = jnp.array(0.0)
        for name in sorted(set(model_lp) | set(guide_lp)):
            elbo = elbo + (model_lp.get(name, jnp.array(0.0)) - guide_lp.get(name, jnp.array(0.0)))
        return {"loss": -elbo, "mutable_state": None}


def _point_guide(model: Model):
    """numpyro guide of one galaxy: a point mass (``Delta``) at a learnable location per
    latent site, started at ``gal.values0`` and constrained to its site's support — the guide
    ``AutoDelta(model, init_loc_fn=init_to_value(...))`` builds, without AutoDelta's prototype
    run (``initialize_model`` traces the whole model and its gradient, once for every SVI
    object: ~3 s of Python tracing per use, four uses per round program). The supports come
    from a trace of the priors alone (``likelihood="none"``: nothing is rendered). Parameter
    names are AutoDelta's (``<site>_auto_loc``)."""

    def guide(gal, likelihood=None):
        start = model.site_values(gal.values0, gal)
        with numpyro.handlers.block():
            prior = numpyro.handlers.trace(seed(model.numpyro_model, 0)).get_trace(gal, likelihood="none")
        for name, site in prior.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            loc = numpyro.param(f"{name}_auto_loc", start[name], constraint=site["fn"].support)
            numpyro.sample(name, dist.Delta(loc))

    return guide


def _svi(model: Model, gal: GalaxyArrays, opts: MapOptions) -> SVI:
    """numpyro SVI of one galaxy: point-mass guide from ``gal.values0``, the optax optimizer."""
    optim = numpyro.optim.optax_to_numpyro(OPTIMIZERS[opts.optimizer](opts.learning_rate))
    return SVI(model.numpyro_model, _point_guide(model), optim, _SortedTraceELBO())


class _SVIState(NamedTuple):
    """SVI loop state of one galaxy: numpyro's state, steps, best loss, steps since a gain."""

    state: object
    it: jnp.ndarray
    best: jnp.ndarray
    since: jnp.ndarray


def _svi_start(model: Model, gal: GalaxyArrays, key, opts: MapOptions) -> _SVIState:
    svi = _svi(model, gal, opts)
    state = svi.init(key, gal, likelihood="gaussian")
    loss0 = svi.evaluate(state, gal, likelihood="gaussian")
    return _SVIState(state, jnp.int32(0), loss0, jnp.int32(0))


def _svi_running(s: _SVIState, opts: MapOptions):
    return (s.it < opts.max_iter) & (s.since < opts.patience)


def _svi_steps(model: Model, gal: GalaxyArrays, s: _SVIState, opts: MapOptions, *, steps=None,
               active=True) -> _SVIState:
    """Up to ``steps`` more SVI steps (all remaining ones if None) while ``active``."""
    svi = _svi(model, gal, opts)
    svi.init(s.state.rng_key, gal, likelihood="gaussian")   # sets svi's constrain_fn (dead code)

    def cond(c):
        s, k = c
        go = active & _svi_running(s, opts)
        return go if steps is None else go & (k < steps)

    def body(c):
        s, k = c
        state, loss = svi.update(s.state, gal, likelihood="gaussian")
        improved = loss < s.best - opts.ftol
        return _SVIState(state, s.it + 1, jnp.minimum(s.best, loss), jnp.where(improved, 0, s.since + 1)), k + 1

    return jax.lax.while_loop(cond, body, (s, jnp.int32(0)))[0]


def _svi_sites(model: Model, gal: GalaxyArrays, key, s: _SVIState, opts: MapOptions) -> dict:
    """The unconstrained sites at the end of SVI: the optimizer's own coordinates of the
    guide's locations (``biject_to(support)``, the map ``unconstrain_fn`` uses), read
    directly rather than constrained and unconstrained again."""
    raw = _svi(model, gal, opts).optim.get_params(s.state.optim_state)
    return {k[: -len("_auto_loc")]: v for k, v in raw.items()}


def _svi_stage(model: Model, gal: GalaxyArrays, key, opts: MapOptions):
    """SVI with a point-mass guide from ``gal.values0``; returns (unconstrained z, steps)."""
    s = _svi_steps(model, gal, _svi_start(model, gal, key, opts), opts)
    return _svi_sites(model, gal, key, s, opts), s.it


def _z_template(model: Model, gal: GalaxyArrays) -> dict:
    """Unconstrained sites at ``gal.values0`` (also the pytree structure of a fit's point)."""
    return unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, model.site_values(gal.values0, gal))


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


def _nearest_middle(angle, lo, hi):
    """The angle ± k·180° (the same ellipse) in [mid − 90°, mid + 90°), mid = (lo + hi)/2."""
    return wrap_angle(angle, 0.5 * (lo + hi))


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
        pa = jnp.clip(_nearest_middle(values[ipa] + 90.0, lo_a, hi_a),
                      lo_a + 1e-4 * (hi_a - lo_a), hi_a - 1e-4 * (hi_a - lo_a))
        q = jnp.clip(_FLIP_Q, lo_q + 1e-3 * (hi_q - lo_q), hi_q)
        values = jnp.where(on_bound, values.at[iq].set(q).at[ipa].set(pa), values)
        need = need | on_bound
    return values, need


def _recentre_angles(model: Model, gal: GalaxyArrays, values):
    """Angles moved by ±180° (the same ellipse) into the middle half of their bounds when
    the bounds span a full turn (the default ``init ± 180°``): an iterate never drifts to
    where the bounded transform saturates and its gradient vanishes."""
    for j, i in enumerate(model.free):
        if not model.entries[i].spec.angle:
            continue
        lo, hi = gal.lo[j], gal.hi[j]
        values = values.at[i].set(jnp.where(hi - lo >= 359.9, _nearest_middle(values[i], lo, hi), values[i]))
    return values


#: Fraction of a bounded parameter's prior range (of its log10 range for log-sampled ones)
#: that LM iterates, and the points Laplace evaluates, keep from the bounds: numpyro's
#: unconstrained coordinate is finite there and its bounded transform not saturated.
BOUND_MARGIN = 1e-5
#: A coordinate within this fraction of its range from a bound, pushed outwards by the
#: gradient, is held there by the LM (and its fit is flagged "at prior bound" by Laplace).
BOUND_TOL = 1e-3

def _sampled(model: Model, free_values):
    """Free values (or bounds) in the coordinates numpyro samples: log10 for log-sampled ones."""
    is_log = jnp.asarray(model.log_sampled)
    return jnp.where(is_log, jnp.log10(jnp.maximum(free_values, 1e-30)), free_values)


#: Largest LM step (max norm) in numpyro's unconstrained coordinates: about a third of a
#: bounded parameter's range near its middle. Weakly constrained directions (the pa of a
#: nearly round galaxy) otherwise get Gauss–Newton steps far into the saturated tails of
#: the bounded transform, where their gradient vanishes and they freeze.
_MAX_STEP = 1.5


def _lm_parts(model: Model, gal: GalaxyArrays, opts: MapOptions) -> "_LMParts":
    """Levenberg–Marquardt on ½‖r(z)‖² + (−log prior) in unconstrained coordinates.

    Stopping rule: the galaxy is *converged* when the undamped Gauss–Newton step at the
    current point predicts a gain below ``lm_ftol`` in χ²/2 (half the Newton decrement
    ``gᵀH⁻¹g``, with H lightly regularised by 1e-6 of its diagonal): a test of the gradient in
    the metric of the curvature, scale-free and immune to float32 rounding of χ² itself. A
    small accepted step is *not* a stopping signal (at large damping a step can be tiny far
    from the minimum). Gains of trial steps are summed pixel by pixel as
    ½Σ(r−r')(r+r'), so they are exact to float32 precision even when χ²/2 ~ 1e4 and the gain
    ~ 1e-4. The damping follows Nielsen's rule (gain ratio ρ: λ·max(1/3, 1 − (2ρ−1)³) on
    success, λ·ν with ν doubling on failure).

    The loop also ends when trial steps keep failing until the damping reaches 1e7: no step
    from the Gauss–Newton one down to a scaled gradient step of relative size 1e-7 lowers
    the objective (computed exactly as above), i.e. the point is a local minimum of the
    objective *as evaluated*. For a smooth model that only happens where the gradient test
    passes too. Where the rendered image is not smooth in the parameters at the float32
    level, the autodiff gradient does not describe the objective and a model can stall with
    the test unmet. Measured on the 37-parameter scene of notebook 03 (7 components,
    truncated Ferrer and King profiles): at the stall the quadratic model predicts a gain
    of 1.66 in χ²/2, but along the Gauss–Newton direction χ²/2 *rises*, by 0.012 at 1/1000
    of the step and 0.9 at 1/10. Plausible causes (not isolated): the truncation edges,
    which move with the parameters, and the central oversampled box, which moves with the
    centre pixel by pixel. Such a stall is reported as converged; ``lm_iter`` steps without
    either is not.

    A galaxy that stops with an ellipse on q = 1 is restarted once from q = 0.97 at pa + 90°
    (:func:`_axis_flip`), in the same loop and iteration budget; the better of the two ends
    (by the objective) is kept.

    Each iteration linearises the residuals once, at the trial point (one forward pass per
    free parameter gives r, JᵀJ and Jᵀr there); an accepted trial carries them to the next
    iteration. So the loop returns, besides the point, the Gauss–Newton matrix JᵀJ *at*
    that point, which :func:`~galbayes.inference.laplace.laplace_errors` reuses. Trial points
    are projected :data:`BOUND_MARGIN` inside the bounds.
    """
    constrained, residuals, neg_log_prior = _objective_parts(model, gal)
    flat0, unravel = jax.flatten_util.ravel_pytree(_z_template(model, gal))

    def res(x):
        return residuals(unravel(x))

    def prior(x):
        return neg_log_prior(unravel(x))

    def to_values(x):
        return model.values_from_sites(constrained(unravel(x)), gal)

    def x_of_sites(sites):
        z = unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, sites)
        return jax.flatten_util.ravel_pytree(z)[0]

    def to_x(values):
        return x_of_sites(model.site_values(values, gal))

    def flipped(x):
        values, need = _axis_flip(model, gal, to_values(x))
        # only the turned coordinates are replaced: a round trip through the bounded
        # transform in float32 would move saturated coordinates of the others
        return jnp.where(is_pair, to_x(values), x), need

    n = flat0.shape[0]
    eye = jnp.eye(n)
    can_flip = bool(model.axis_ratio_pairs)
    # Site bounds in the flat order of x (sorted site names), for the bound test below.
    names = model.site_names
    order = sorted(range(model.n_free), key=lambda j: names[j])
    site_keys = [names[j] for j in order]
    lo_s = _sampled(model, gal.lo)[jnp.asarray(order)]
    hi_s = _sampled(model, gal.hi)[jnp.asarray(order)]
    is_angle = jnp.asarray([model.entries[model.free[j]].spec.angle for j in order])
    bounded = jnp.asarray([model.entries[model.free[j]].param.prior is None for j in order])
    pair_coords = {c for pair in model.axis_ratio_pairs for c in pair}
    is_pair = jnp.asarray([j in pair_coords for j in order])
    has_angles = any(model.entries[i].spec.angle for i in model.free)

    def sites_of(x):
        sites = constrained(unravel(x))
        return jnp.stack([sites[k] for k in site_keys])

    def into_box(x):
        """Trial point projected into the bounds less BOUND_MARGIN of the range (and angles
        recentred): the fit never ends where the bounded transform saturates, so its final
        point is where Laplace evaluates (laplace.values_into_bounds changes nothing)."""
        s = sites_of(x)
        m = BOUND_MARGIN * (hi_s - lo_s)
        outside = bounded & ((s < lo_s + m) | (s > hi_s - m))
        clipped = jnp.where(outside, jnp.clip(s, lo_s + m, hi_s - m), s)
        x = jnp.where(outside, x_of_sites({k: clipped[j] for j, k in enumerate(site_keys)}), x)
        if has_angles:
            x = jnp.where(is_angle, to_x(_recentre_angles(model, gal, to_values(x))), x)
        return x

    def active_bounds(x, grad):
        """Coordinates on a bound (within 1e-3 of the prior range) that the gradient pushes
        further out: a bounded transform's z then runs to infinity with a gain that shrinks
        but a Newton decrement that does not (g_z²/h_z is the same in the bounded variable),
        so they are left out of the convergence test."""
        s = sites_of(x)
        tol = BOUND_TOL * (hi_s - lo_s)
        deep = 2 * BOUND_MARGIN * (hi_s - lo_s)     # on the margin: the gradient's sign is noise
        active = (((s < lo_s + tol) & (grad > 0)) | ((s > hi_s - tol) & (grad < 0))
                  | (s < lo_s + deep) | (s > hi_s - deep))
        # an ellipse held on q = 1 is round: its pa is undetermined (gradient and curvature
        # both vanish with 1 - q, their Newton ratio does not), so it is left out too
        for jq, jpa in model.axis_ratio_pairs:
            iq, ipa = order.index(jq), order.index(jpa)
            active = active.at[ipa].set(active[ipa] | (active[iq] & (s[iq] > hi_s[iq] - tol[iq])))
        return active

    def linearised(x):
        """Residuals, JᵀJ and Jᵀr at x: one forward pass per free parameter."""
        def with_value(y):
            r = res(y)
            return r, r
        jac, r = jax.jacfwd(with_value, has_aux=True)(x)
        return r, jac.T @ jac, jac.T @ r

    def running(c):
        # iteration 0 is the start's linearisation (a "pending" trial, see start below)
        return (c.it < opts.lm_iter + 1) & ~c.done

    def body(c):
        p0 = prior(c.x)
        grad = c.jtr + jax.grad(prior)(c.x)
        hess = c.gn + jax.hessian(prior)(c.x)
        diag = jnp.maximum(jnp.diag(hess), 1e-12)
        # predicted gain of the (almost) undamped Gauss–Newton step, over the coordinates
        # not held by a bound
        keep = ~active_bounds(c.x, grad)
        h_in = jnp.where(keep[:, None] & keep[None, :], hess, 0.0) + jnp.diag(jnp.where(keep, 1e-6 * diag, 1.0))
        g_in = jnp.where(keep, grad, 0.0)
        decrement = 0.5 * jnp.dot(g_in, jnp.linalg.solve(h_in, g_in))
        at_min = ~c.pending & jnp.isfinite(decrement) & (decrement < opts.lm_ftol)
        # projected LM step: coordinates held by a bound stay put (else their runaway
        # component, capped below, would shrink everyone's step)
        step = jnp.linalg.solve(h_in + jnp.diag(jnp.where(keep, c.lam * diag, 0.0)) + 1e-12 * eye, -g_in)
        step = jnp.where(jnp.all(jnp.isfinite(step)), step, jnp.zeros_like(step))
        step = step * jnp.minimum(1.0, _MAX_STEP / jnp.maximum(jnp.max(jnp.abs(step)), 1e-30))
        # the trial point: the step, or (first iteration after a q-flip) the flipped start
        x_try = jnp.where(c.pending, c.x_alt, into_box(c.x + step))
        r_try, gn_try, jtr_try = linearised(x_try)
        gain = -(0.5 * jnp.sum((r_try - c.r) * (r_try + c.r)) + (prior(x_try) - p0))
        predicted = -(jnp.dot(grad, step) + 0.5 * step @ hess @ step)
        rho = gain / jnp.maximum(predicted, 1e-30)
        accept = c.pending | (~at_min & jnp.isfinite(gain) & (gain > 0))
        sel = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        x, r, gn, jtr = sel(x_try, c.x), sel(r_try, c.r), sel(gn_try, c.gn), sel(jtr_try, c.jtr)
        lam_ok = c.lam * jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * jnp.clip(rho, 0.0, 1.0) - 1.0) ** 3)
        lam = jnp.clip(jnp.where(accept, lam_ok, c.lam * c.nu), 1e-9, 1e8)
        nu = jnp.where(accept, 2.0, c.nu * 2.0)
        lam, nu = jnp.where(c.pending, 1e-3, lam), jnp.where(c.pending, 2.0, nu)
        stalled = ~c.pending & ~at_min & ~accept & (lam >= 1e7)
        done = at_min | stalled
        c = c._replace(x=x, r=r, gn=gn, jtr=jtr, lam=lam, nu=nu, it=c.it + 1, converged=done,
                       done=done, pending=jnp.bool_(False),
                       gn_keep=jnp.where(c.it == 0, gn_try, c.gn_keep))
        if can_flip:
            x_alt, need = flipped(x)
            restart = done & (c.phase == 0) & need
            keep_old = lambda new, old: jnp.where(restart, new, old)  # noqa: E731
            c = c._replace(x_keep=keep_old(x, c.x_keep), gn_keep=keep_old(gn, c.gn_keep),
                           f_keep=keep_old(0.5 * jnp.sum(r * r) + prior(x), c.f_keep),
                           conv_keep=keep_old(done, c.conv_keep), x_alt=keep_old(x_alt, c.x_alt),
                           pending=restart, phase=jnp.where(restart, 1, c.phase), done=done & ~restart)
        return c

    def start(flat):
        """The state before iteration 0, which linearises at the start projected into the
        bounds (the trial point of a pending iteration is accepted as it is)."""
        x0 = into_box(flat)
        zr = jnp.zeros(gal.image.size, jnp.float32)
        zm = jnp.zeros((n, n), jnp.float32)
        return _LMState(x=x0, r=zr, gn=zm, jtr=jnp.zeros(n, jnp.float32), lam=jnp.float32(1e-3),
                        nu=jnp.float32(2.0), it=jnp.int32(0), converged=jnp.bool_(False),
                        done=jnp.bool_(False), pending=jnp.bool_(True), x_alt=x0, phase=jnp.int32(0),
                        x_keep=x0, gn_keep=zm, f_keep=jnp.float32(jnp.inf), conv_keep=jnp.bool_(False))

    def finish(c):
        """(unconstrained sites, LM steps, converged, JᵀJ) of a finished loop: the better of
        the two ends when the fit was restarted."""
        x, gn, converged = c.x, c.gn, c.converged
        if can_flip:
            better = (0.5 * jnp.sum(c.r * c.r) + prior(x)) < c.f_keep     # f_keep = inf unless restarted
            x, gn = jnp.where(better, x, c.x_keep), jnp.where(better, gn, c.gn_keep)
            converged = jnp.where(better, converged, c.conv_keep)
        return unravel(x), c.it - 1, converged, gn

    return _LMParts(start, running, body, finish)


def _lm_stage(model: Model, gal: GalaxyArrays, z0: dict, opts: MapOptions):
    """The whole LM polish of one galaxy from unconstrained sites ``z0`` in one loop
    (see :func:`_lm_parts`): (sites, steps, converged, JᵀJ)."""
    lm = _lm_parts(model, gal, opts)
    c = jax.lax.while_loop(lm.running, lm.body, lm.start(jax.flatten_util.ravel_pytree(z0)[0]))
    return lm.finish(c)


class _LMParts(NamedTuple):
    """One galaxy's LM as pieces a driver can run in rounds: ``start(flat) -> state``,
    ``running(state) -> bool``, ``body(state) -> state``, ``finish(state)``."""

    start: object
    running: object
    body: object
    finish: object


class _LMState(NamedTuple):
    """Levenberg–Marquardt loop state of one galaxy (r, JᵀJ, Jᵀr always belong to x)."""

    x: jnp.ndarray          # current point (flat unconstrained coordinates)
    r: jnp.ndarray          # whitened residuals at x
    gn: jnp.ndarray         # JᵀJ at x
    jtr: jnp.ndarray        # Jᵀr at x
    lam: jnp.ndarray        # damping
    nu: jnp.ndarray         # damping growth factor
    it: jnp.ndarray
    converged: jnp.ndarray  # the last test: gradient test passed or stalled
    done: jnp.ndarray
    pending: jnp.ndarray    # next trial point is x_alt (the q-flip restart)
    x_alt: jnp.ndarray
    phase: jnp.ndarray      # 1 after the q-flip restart
    x_keep: jnp.ndarray     # the end before the restart, its JᵀJ, objective and test
    gn_keep: jnp.ndarray
    f_keep: jnp.ndarray
    conv_keep: jnp.ndarray


def _finish(model: Model, opts: MapOptions, gal: GalaxyArrays, z: dict, n_svi, n_lm, done, gn, render: bool = False):
    """Per-galaxy outputs at the fitted sites ``z``: (values, χ², log-likelihood, SVI steps,
    LM steps, converged, flat z, JᵀJ[, model image, component images])."""
    flat = jax.flatten_util.ravel_pytree(z)[0]
    sites = constrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, z)
    values = model.values_from_sites(sites, gal)
    # float32 rounding of the bijection can land on, or one ulp beyond, a bound (SVI without
    # the LM, whose iterates keep BOUND_MARGIN); keep the MAP strictly inside so that refits
    # (bootstrap), Laplace and NUTS can start from it. Log-sampled entries in log10.
    free = jnp.asarray(model.free)
    lo, hi, v = _sampled(model, gal.lo), _sampled(model, gal.hi), _sampled(model, values[free])
    margin = 0.1 * BOUND_MARGIN * (hi - lo)
    inside = jnp.clip(v, lo + margin, hi - margin)
    is_log = jnp.asarray(model.log_sampled)
    values = values.at[free].set(jnp.where(inside == v, values[free], jnp.where(is_log, 10.0**inside, inside)))
    c2 = model.chi2(values, gal)
    out = (values, c2, model.loglike_from_chi2(c2, gal), n_svi, n_lm, done, flat, gn)
    if render:
        out = out + (model.render(values, gal), model.render_components(values, gal))
    return out


def _fit_one(model: Model, opts: MapOptions, gal: GalaxyArrays, key, render: bool = False):
    """The whole fit of one galaxy in one pass (SVI loop, then LM loop): the reference the
    round-based driver of :func:`fit_map` reproduces galaxy by galaxy."""
    if opts.max_iter > 0:
        z, n_svi = _svi_stage(model, gal, key, opts)
    else:
        z, n_svi = _z_template(model, gal), jnp.int32(0)
    if opts.polish == "lm":
        z, n_lm, done, gn = _lm_stage(model, gal, z, opts)
    else:
        n_lm, done = jnp.int32(0), n_svi < opts.max_iter
        gn = jnp.full((model.n_free, model.n_free), jnp.nan, jnp.float32)
    return _finish(model, opts, gal, z, n_svi, n_lm, done, gn, render)


# --------------------------------------------------------------------------- rounds
#: Iterations per round of the round-based driver (SVI steps in the SVI stage, LM steps in
#: the LM stage): between rounds finished galaxies leave the batch and waiting ones take
#: their slots, so a batch is never held up by its slowest galaxy for more than this.
ROUND_ITER = 4

_SVI, _LM, _FINISH = 0, 1, 2          # stages of the program
_IDLE = 2                             # slot phase: nothing to do (finished or empty)


class _Slot(NamedTuple):
    """State of one slot of the batch (leading axis = slot)."""

    phase: jnp.ndarray      # 0: in SVI, 1: in LM, 2: idle
    svi: object             # _SVIState (None without SVI)
    lm: object              # _LMState (None without the LM polish)
    x: jnp.ndarray          # (S,) flat unconstrained point at the end of the slot's stage
    n: jnp.ndarray          # (3,) int32: SVI steps, LM steps, converged
    gn: jnp.ndarray         # (S, S) JᵀJ at x (LM stage)


def _select(mask, new, old):
    """Per slot: ``new`` where ``mask`` else ``old`` (pytrees with a leading slot axis)."""
    def sel(a, b):
        m = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
        return jnp.where(m, a, b)
    return jax.tree_util.tree_map(sel, new, old)


def _where_any(mask, fn, slots):
    """``fn(slots)`` merged in where ``mask``; skipped entirely (a real branch) if no slot is."""
    return jax.lax.cond(jnp.any(mask), lambda s: _select(mask, fn(s), s), lambda s: s, slots)


def _round_program(model: Model, opts: MapOptions, round_iter: int, render: bool):
    """One jitted program per model, options and batch shape, driven by :func:`_run_rounds`.

    ``program(slots, gal, start, x_in, n_in, gn_in, key, stage)`` (every argument has the
    slot axis first; ``stage`` is the same in every slot):

    * stage 0 (SVI): slots with ``start == 1`` begin SVI on their galaxy, ``start == 2``
      go idle; every slot in SVI takes up to ``round_iter`` steps; slots whose SVI has
      ended store its point in ``x`` and go idle.
    * stage 1 (LM): slots with ``start == 1`` begin the LM from ``x_in`` (from the start
      values without SVI); up to ``round_iter`` LM steps (the q-flip restart included);
      finished slots store point, steps, convergence and JᵀJ and go idle.
    * stage 2 (finish): per slot, the outputs of :func:`_finish` at ``x_in`` (values, χ²,
      log-likelihood, ... and, with ``render``, the model and component images).

    Each galaxy follows exactly the iterations of :func:`_fit_one`; only the batch it is
    computed with changes (float rounding).
    """
    svi_on, lm_on = opts.max_iter > 0, opts.polish == "lm"
    S = model.n_free

    def unravel(x, gal):
        return jax.flatten_util.ravel_pytree(_z_template(model, gal))[1](x)

    def ravel(z):
        return jax.flatten_util.ravel_pytree(z)[0]

    def finish(gal, x, n, gn):
        return _finish(model, opts, gal, unravel(x, gal), n[0], n[1], n[2] > 0, gn, render)

    def blank(gal, key):
        z = _z_template(model, gal)
        return _Slot(phase=jnp.int32(_IDLE),
                     svi=_svi_start(model, gal, key, opts) if svi_on else None,
                     lm=_lm_parts(model, gal, opts).start(ravel(z)) if lm_on else None,
                     x=ravel(z), n=jnp.zeros(3, jnp.int32), gn=jnp.zeros((S, S), jnp.float32))

    def begin_svi(slot, gal, key):
        return slot._replace(phase=jnp.int32(_SVI), svi=_svi_start(model, gal, key, opts))

    def run_svi(slot, gal):
        return slot._replace(svi=_svi_steps(model, gal, slot.svi, opts, steps=round_iter,
                                            active=slot.phase == _SVI))

    def end_svi(slot, gal, key):
        it = slot.svi.it
        return slot._replace(phase=jnp.int32(_IDLE), x=ravel(_svi_sites(model, gal, key, slot.svi, opts)),
                             n=jnp.stack([it, jnp.int32(0), (it < opts.max_iter).astype(jnp.int32)]))

    def begin_lm(slot, gal, x0):
        if not svi_on:
            x0 = ravel(_z_template(model, gal))
        return slot._replace(phase=jnp.int32(_LM), lm=_lm_parts(model, gal, opts).start(x0))

    def run_lm(slot, gal):
        lm = _lm_parts(model, gal, opts)
        active = slot.phase == _LM

        def cond(c):
            return active & lm.running(c[0]) & (c[1] < round_iter)

        return slot._replace(lm=jax.lax.while_loop(cond, lambda c: (lm.body(c[0]), c[1] + 1),
                                                   (slot.lm, jnp.int32(0)))[0])

    def end_lm(slot, gal):
        z, n_lm, converged, gn = _lm_parts(model, gal, opts).finish(slot.lm)
        return slot._replace(phase=jnp.int32(_IDLE), x=ravel(z),
                             n=jnp.stack([slot.n[0], n_lm, converged.astype(jnp.int32)]), gn=gn)

    def program(slots, gal, start, x_in, n_in, gn_in, key, stage):
        B, (ny, nx) = start.shape[0], gal.image.shape[1:]
        z = jnp.zeros
        no_out = (z((B, len(model.entries)), jnp.float32), z(B, jnp.float32), z(B, jnp.float32), z(B, jnp.int32),
                  z(B, jnp.int32), z(B, bool), z((B, S), jnp.float32), z((B, S, S), jnp.float32))
        if render:
            no_out = no_out + (z((B, ny, nx), jnp.float32), {c.name: z((B, ny, nx), jnp.float32)
                                                            for c in model.components})
        fresh, retire = start == 1, start == 2

        def svi_branch(slots):
            slots = _where_any(fresh, lambda s: jax.vmap(begin_svi)(s, gal, key), slots)
            slots = slots._replace(phase=jnp.where(retire, _IDLE, slots.phase))
            slots = jax.vmap(run_svi)(slots, gal)
            ended = (slots.phase == _SVI) & ~jax.vmap(lambda s: _svi_running(s, opts))(slots.svi)
            return _where_any(ended, lambda s: jax.vmap(end_svi)(s, gal, key), slots), no_out

        def lm_branch(slots):
            slots = _where_any(fresh, lambda s: jax.vmap(begin_lm)(s, gal, x_in), slots)
            slots = slots._replace(phase=jnp.where(retire, _IDLE, slots.phase))
            slots = jax.vmap(run_lm)(slots, gal)
            lm = (slots.lm.it < opts.lm_iter + 1) & ~slots.lm.done      # _LMParts.running, per slot
            ended = (slots.phase == _LM) & ~lm
            return _where_any(ended, lambda s: jax.vmap(end_lm)(s, gal), slots), no_out

        def finish_branch(slots):
            return slots, jax.vmap(finish)(gal, x_in, n_in, gn_in)

        def unused(slots):
            return slots, no_out

        branches = [svi_branch if svi_on else unused, lm_branch if lm_on else unused, finish_branch]
        return jax.lax.switch(stage[0], branches, slots)

    return program, blank


class _Rounds:
    """The round program of one model, options, round length and render flag (jitted; one
    XLA program per batch shape). ``rounds.callable()(slots, gal, start, x_in, n_in, gn_in,
    key, stage)`` returns ``(slots, (phase, x, n, gn), out)`` (see
    :func:`_round_program`); ``rounds.zeros(gal, key)`` gives the initial slots."""

    def __init__(self, model: Model, opts: MapOptions, round_iter: int, render: bool):
        self.program, blank = _round_program(model, opts, round_iter, render)
        self.blank = jax.vmap(blank)
        self.jitted = jax.jit(self.program)
        # a warm process loads the traced program instead of tracing it (galbayes.traced)
        self.traced = TracedProgram(
            self.program, self.jitted,
            lambda: {"program": "map_rounds", "model": describe_model(model), "options": canon(opts),
                     "round_iter": int(round_iter), "render": bool(render)},
            enabled=galbayes_code_only(model))

    def _program(self):
        """The stored program (galbayes.traced), or the plain jitted one under a mesh of
        several devices: there each device runs the program on its own block
        (:func:`galbayes.devices.data_parallel`), and a loaded executable is bound to one
        device."""
        from ..devices import active_mesh

        return self.jitted if active_mesh() is not None else self.traced

    def zeros(self, gal, key):
        prog = self._program()
        shapes = (prog.eval_shape("blank", self.blank, gal, key) if prog is self.traced   # stored with it
                  else jax.eval_shape(self.blank, gal, key))
        return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    def callable(self):
        prog = self._program()

        def run(*args):
            slots, out = prog(*args)
            return slots, (slots.phase, slots.x, slots.n, slots.gn), out
        return run

    def lower(self, *args):
        return self._program().lower(*args)


def _compiled(model: Model, opts: MapOptions, round_iter: int = ROUND_ITER, render: bool = False) -> _Rounds:
    """The round program of a model and options (:class:`_Rounds`; one compiled program per
    batch shape, cached on the model by :func:`galbayes.compiled.compiled`); every MAP fit
    goes through here."""
    def build():
        from .. import cache

        cache.ensure()
        return _Rounds(model, opts, int(round_iter), bool(render))

    return compiled(model, ("map_rounds", opts, int(round_iter), bool(render)), build)


def _run_rounds(model: Model, opts: MapOptions, batch: GalaxyArrays, keys, n_slots: int,
                round_iter: int, render: bool):
    """Fit the ``n`` galaxies of ``batch`` through ``n_slots`` slots: per stage (SVI, LM) a
    queue of galaxies; after each round of ``round_iter`` iterations finished galaxies leave
    their slots and waiting ones take them; then the outputs in batches of ``n_slots``."""
    from ..devices import data_parallel, place_tree

    rounds = _compiled(model, opts, round_iter, render)
    batch = jax.tree_util.tree_map(np.asarray, batch)
    keys = np.asarray(keys)
    n = int(batch.image.shape[0])
    S = model.n_free
    B = int(n_slots)

    def rows(idx):
        return jax.tree_util.tree_map(lambda a: a[idx], batch)

    data = rows(np.minimum(np.arange(B), n - 1))
    key_slots = keys[np.minimum(np.arange(B), n - 1)]
    # under use_devices(): each device runs the program on its block of slots
    program = data_parallel(rounds.callable())
    slots = place_tree(rounds.zeros(data, key_slots))
    x_all = np.zeros((n, S), np.float32)
    n_all = np.zeros((n, 3), np.int32)
    gn_all = np.full((n, S, S), np.nan, np.float32)

    def run_stage(stage):
        nonlocal slots, data
        waiting = list(range(n - 1, -1, -1))
        owner = np.full(B, -1)
        start = np.full(B, 2, np.int32)
        x_in = np.zeros((B, S), np.float32)
        n_in = np.zeros((B, 3), np.int32)
        gn_in = np.zeros((B, S, S), np.float32)
        stage_arr = np.full(B, stage, np.int32)
        data = jax.tree_util.tree_map(np.copy, data)

        def refill(s):
            if not waiting:
                return
            g = waiting.pop()
            owner[s], start[s] = g, 1
            for dst, src in zip(data, batch):
                dst[s] = src[g]
            key_slots[s], x_in[s], n_in[s] = keys[g], x_all[g], n_all[g]

        def snapshot(tree):    # the host buffers are refilled in place: never hand them out
            return jax.tree_util.tree_map(np.copy, tree)

        for s in range(B):
            refill(s)
        data_dev = place_tree(snapshot(data))
        while True:
            slots, (phase, x, cnt, gn), _ = program(slots, data_dev, *snapshot((start, x_in, n_in, gn_in, key_slots)),
                                                    stage_arr)
            start[:] = 0
            phase = np.asarray(phase)
            done = np.flatnonzero((phase == _IDLE) & (owner >= 0))
            if done.size:
                x, cnt = np.asarray(x), np.asarray(cnt)
                gn = np.asarray(gn) if stage == _LM else None
                for s in done:
                    g = owner[s]
                    x_all[g] = x[s]
                    if stage == _SVI:
                        n_all[g] = cnt[s]
                    else:
                        n_all[g, 1:] = cnt[s, 1:]
                        gn_all[g] = gn[s]
                    owner[s] = -1
                    refill(s)
                if (owner < 0).all():
                    break
                data_dev = place_tree(snapshot(data))

    if opts.max_iter > 0:
        run_stage(_SVI)
    if opts.polish == "lm":
        run_stage(_LM)
    outs = []
    for begin in range(0, n, B):
        idx = np.minimum(np.arange(begin, begin + B), n - 1)
        _, _, out = program(slots, place_tree(rows(idx)), np.zeros(B, np.int32), x_all[idx], n_all[idx],
                            gn_all[idx], keys[idx], np.full(B, _FINISH, np.int32))
        m = min(B, n - begin)
        outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:m], out))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


def precompile(model: Model, batch: GalaxyArrays, *, options: MapOptions | None = None, slots: int | None = None,
               render: bool = False, round_iter: int = ROUND_ITER) -> float:
    """Compile ahead of time the program :func:`fit_map` runs for ``batch`` (its shapes) and
    return the seconds it took (a persistent-cache hit takes a fraction of a second)."""
    from ..batching import slot_count

    opts = options or MapOptions()
    rounds = _compiled(model, opts, round_iter, render)
    batch = jax.tree_util.tree_map(np.asarray, batch)
    n = int(batch.image.shape[0])
    B = slot_count(n, slots or n)
    idx = np.minimum(np.arange(B), n - 1)
    data = jax.tree_util.tree_map(lambda a: a[idx], batch)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(opts.seed), B))
    slot0 = rounds.zeros(data, keys)
    S = model.n_free
    t0 = time.perf_counter()
    rounds.lower(slot0, data, np.zeros(B, np.int32), np.zeros((B, S), np.float32), np.zeros((B, 3), np.int32),
                 np.zeros((B, S, S), np.float32), keys, np.zeros(B, np.int32)).compile()
    return time.perf_counter() - t0


def default_streams() -> int:
    """Round drivers a fit runs at once (:func:`fit_map`'s ``streams``): the CPU cores this
    process may use (at most 8) on a CPU, 1 on an accelerator.

    XLA runs one program call on about one core of a CPU (measured: 113 % CPU for a warm
    catalog run on 2 cores), and a round driver waits on each call; two drivers on two
    cores fit 1.4× as many galaxies per second (``benchmarks/README.md``). A GPU is kept busy
    by large batches instead.
    """
    if jax.default_backend() != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def check_streams(streams) -> int:
    """``streams`` as an int (:func:`default_streams` for None); OptionsError below 1."""
    k = default_streams() if streams is None else int(streams)
    if k < 1:
        raise OptionsError(f"streams must be >= 1, got {streams}")
    return k


def _streamed(run, n: int, n_slots: int, streams: int | None):
    """``run(idx)`` for ``streams`` interleaved parts of ``range(n)`` at once (threads: the
    program calls release the GIL), merged back in galaxy order; at most one part per set of
    ``n_slots`` galaxies begun (13 galaxies in 8 slots: two parts of 7 and 6, each fitted at
    once, rather than one part whose last 5 wait for a slot), and one part under a mesh of
    several devices."""
    from ..devices import active_mesh

    k = check_streams(streams)
    k = 1 if active_mesh() is not None else max(1, min(k, -(-n // max(n_slots, 1))))
    if k == 1:
        return run(np.arange(n))
    from concurrent.futures import ThreadPoolExecutor

    import contextvars

    parts = [np.arange(j, n, k) for j in range(k)]
    contexts = [contextvars.copy_context() for _ in parts]     # the caller's context in each thread
    with ThreadPoolExecutor(max_workers=k, thread_name_prefix="galbayes-stream") as pool:
        outs = list(pool.map(lambda ctx, idx: ctx.run(run, idx), contexts, parts))

    def merge(*leaves):
        first = np.asarray(leaves[0])
        full = np.empty((n,) + first.shape[1:], first.dtype)
        for idx, leaf in zip(parts, leaves):
            full[idx] = np.asarray(leaf)
        return full
    return jax.tree_util.tree_map(merge, *outs)


def fit_map(model: Model, batch: GalaxyArrays, *, options: MapOptions | None = None, slots: int | None = None,
            render: bool = False, round_iter: int = ROUND_ITER, streams: int | None = None,
            **kwargs) -> MapResult:
    """Fit galaxies: SVI + optax, then LM polish, in one jitted program run in rounds.

    Parameters
    ----------
    model : Model
        The model.
    batch : GalaxyArrays
        Stacked galaxies (:meth:`Model.stack` of :meth:`Model.pack` outputs), any number.
    options : MapOptions, optional
        Settings; keyword arguments override its fields.
    slots : int, optional
        Galaxies computed together (the compiled batch shape; default: all of ``batch``).
        With fewer slots than galaxies, a galaxy that has finished a stage hands its slot
        to the next waiting one after each round, so no slot idles while galaxies wait
        (:func:`_run_rounds`); every galaxy's answer is the same as in a batch of its own
        (to float rounding).
    render : bool
        Also return the model image and the component images at the MAP
        (``MapResult.images``, ``MapResult.components``), computed in the same program.
    round_iter : int
        Iterations per round (:data:`ROUND_ITER`).
    streams : int, optional
        Round drivers run at once, each on an interleaved share of the galaxies through its
        own ``slots`` (threads calling the same compiled program; default
        :func:`default_streams`: the CPU cores, 1 on an accelerator or a mesh of several
        devices). A galaxy's answer depends on it only as on its slot: to float32 rounding.

    Returns
    -------
    MapResult
    """
    from ..batching import slot_count
    from ..devices import active_mesh, n_devices, padded_to_devices

    opts = options or MapOptions()
    if kwargs:
        opts = MapOptions(**{**opts.__dict__, **kwargs})
    n = int(np.shape(batch.image)[0])
    keys = jax.random.split(jax.random.PRNGKey(opts.seed), n)
    # Under galbayes.devices.use_devices() the slots are a multiple of the device count and
    # split over the galaxy axis: each device runs the program on its own block of slots.
    n_slots = padded_to_devices(slot_count(n, slots or n), n_devices(active_mesh()))
    keys = np.asarray(keys)
    _compiled(model, opts, round_iter, render)         # built once, before any stream thread

    def run(idx):
        part = batch if idx.size == n else jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], batch)
        return _run_rounds(model, opts, part, keys[idx], n_slots, round_iter, render)
    out = _streamed(run, n, n_slots, streams)
    values, c2, ll, n_svi, n_lm, done, flat, gn = out[:8]
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
        unconstrained=flat,
        gauss_newton=gn,
        images=out[8] if render else None,
        components=out[9] if render else None,
    )

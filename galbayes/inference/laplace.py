"""Laplace error bars for a batch of galaxies: the paper's covariance and numpyro's Laplace.

Two estimates of the parameter covariance at the MAP, both computed for all galaxies of a
batch in one jitted, ``jax.vmap``-ed program and inverted per galaxy with explicit flags:

``method="jacobian"`` — the paper's §5.2 covariance
    ``C = (Jᵀ W J)⁻¹``, J the Jacobian of the PSF-convolved model pixels with respect to
    the free parameters **in user units** (pixels or arcsec, degrees, magnitudes; a
    log-sampled parameter such as ``re`` or ``n`` is differentiated with respect to the
    value itself, not its log), ``W = diag(Ω/σ²)``. This is the Gauss–Newton
    approximation of the curvature of χ²/2; it ignores the priors.

``method="hessian"`` (default) — numpyro's Laplace approximation
    The inverse Hessian of the potential energy (negative log posterior **including** the
    log-Jacobian of the bijection to the unconstrained space, i.e. exactly what
    ``numpyro.infer.util.potential_energy`` and ``AutoLaplaceApproximation`` use) in
    numpyro's unconstrained coordinates ``z``, mapped to user units by the delta method:
    ``C = G H⁻¹ Gᵀ`` with ``G = ∂values/∂z`` (``jax.jacfwd`` of the constrain map). It
    always uses the **Gaussian** pixel likelihood (see below). It is evaluated at the
    given MAP (the χ² minimum, see :mod:`galbayes.inference.map`), not at the mode of the
    unconstrained density; the two differ by the gradient of the log-Jacobian, which is
    negligible when the data dominate (otherwise the galaxy is flagged as unconstrained).
    With the default flat priors and well-constrained parameters, (a) and (b) agree to
    a few per cent (``tests/test_laplace.py``).

    The Hessian is not ``jax.hessian`` of the whole potential (forward-over-reverse through
    the FFT convolution, vectorised over the parameters) but its exact decomposition
    ``JᵀJ − ∇²(Σ u·A) + ∇²P`` (:func:`_one_hessian`): the second-order term needs no FFT,
    is taken as S Hessian-vector products one after another, and ``JᵀJ`` is the
    Gauss–Newton matrix of the MAP fit's last LM step when :func:`laplace_errors` is given
    the fit itself. Same numbers to float32 rounding; measured cost on 128×128 mocks
    (``benchmarks/bench_errors.py``) ~13% of the MAP fit from the fit, ~20% from values alone,
    vs ~40% for ``jax.hessian``.

Why the χ²-distribution likelihood is never used for error bars
---------------------------------------------------------------
With ``ln L = (k/2 − 1) ln χ² − χ²/2 + const`` (eq. 17) the Hessian with respect to the
parameters is ::

    ∇² ln L = [(k/2 − 1)/χ² − 1/2] ∇²χ² − (k/2 − 1)/χ⁴ ∇χ² ∇χ²ᵀ

while the Gaussian one is ``−½ ∇²χ²``. At the χ² minimum (galbayes' MAP, ∇χ² = 0) the
ratio of the two is ``1 − (k − 2)/χ²_min``: with ``χ²_min ≈ k ± √(2k)`` for a correct
model and correct σ, this is 2/k on average (exactly 2/k when χ²_min = k), of either sign
from one noise realisation to the next (|ratio| ~ √(2/k)), i.e. the χ²-distribution
curvature is of order 1/k of the Gaussian one and half the time not even a maximum. At the
χ²-distribution likelihood's own maxima (the shell χ² = k − 2) the first term vanishes and
the Hessian is rank one: zero curvature along the shell. Its Laplace errors would thus be
√(k/2) times the real ones when χ²_min = k (k ~ 10⁴ pixels: 70×), ~(k/2)^¼ times
(~8×) for a typical |χ²_min − k| ~ √(2k), undefined half the time, and infinite along the
shell: meaningless; :func:`loglike_curvature` measures this and ``tests/test_laplace.py``
checks it. The Gaussian pixel likelihood is the one whose curvature is the Fisher
information of the data.

Flags
-----
Each galaxy gets a flag string, ``"ok"`` or what went wrong (several joined by ``"; "``):

* ``"covariance not finite"`` — non-finite derivatives (errors NaN).
* ``"covariance singular: <keys> ..."`` / ``"covariance not positive definite: <keys> ..."``
  — the curvature matrix (normalised to unit diagonal, inverted in float64) has an
  eigenvalue ≤ 1e-5 (resp. < −1e-5); a parameter with no effect at all on the image has a
  zero diagonal. The parameters that carry the bad eigen-directions get an **infinite**
  error (undetermined) and NaN covariances; the others come from the inverse on the
  well-determined subspace.
* ``"unconstrained by the data (...): <keys>"`` — the 1σ error exceeds a quarter of the
  prior range (in log10 for log-sampled parameters): the data barely constrain that
  parameter (e.g. a pa of a round galaxy, whose float32 derivative is rounding noise) and
  the error reflects the prior or noise.
* ``"at prior bound: <keys>"`` — the MAP sits at a bound (within
  :data:`~galbayes.inference.map.BOUND_TOL` of the prior range, where the LM holds a
  parameter the data push outwards); Gaussian errors are unreliable.

Errors are never silently NaN: a NaN or infinite error always comes with a flag.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import constrain_fn, potential_energy, unconstrain_fn

from ..compiled import compiled
from ..errors import OptionsError
from ..model import GalaxyArrays, Model
from ..params import wrap_angle
from ..status import join_problems
from .map import BOUND_MARGIN, BOUND_TOL, MapResult

__all__ = ["LaplaceResult", "laplace_errors", "loglike_curvature", "invert_curvature",
           "values_into_bounds", "EIG_TOL", "BOUND_MARGIN"]

#: Smallest eigenvalue of the unit-diagonal curvature matrix treated as non-singular (the
#: matrices are accumulated in float32, relative precision ~1e-6).
EIG_TOL = 1e-5
#: An error larger than this fraction of the prior range is flagged "unconstrained by the data".
PRIOR_FRACTION = 0.25
_NONE = {"likelihood": "none"}
_GAUSS = {"likelihood": "gaussian"}


class LaplaceResult(NamedTuple):
    """Per-galaxy Laplace errors (unpacks as ``errors, covariance, flags``).

    errors : (B, E) 1σ error of every entry in user units (0 for fixed entries; ``inf``
        for an undetermined parameter, NaN only when the flag says non-finite).
    covariance : (B, S, S) covariance of the free parameters (``model.free_keys`` order)
        in user units, float64.
    flags : list of B strings, ``"ok"`` or the problems (see module docstring).
    """

    errors: np.ndarray
    covariance: np.ndarray
    flags: list


# --------------------------------------------------------------------------- helpers


def values_into_bounds(model: Model, batch: GalaxyArrays, values) -> np.ndarray:
    """Free values moved where numpyro's unconstrain map is finite.

    * Angles are shifted by a multiple of 180° to the equivalent angle nearest the middle of
      each galaxy's bounds: :func:`~galbayes.inference.map.fit_map` reports them wrapped
      into [-90°, 90°), but a galaxy's pa bounds are ``init ± 180°`` by default. An ellipse
      is symmetric under 180°.
    * A value on (or, by float32 rounding, just beyond) a bound is moved
      :data:`BOUND_MARGIN` of the prior range inside it; such galaxies are flagged "at prior
      bound" by :func:`laplace_errors`.
    """
    values = np.array(values, dtype=np.float64, copy=True)
    lo, hi = np.asarray(batch.lo, np.float64), np.asarray(batch.hi, np.float64)
    for j, i in enumerate(model.free):
        e = model.entries[i]
        v = values[..., i]
        if e.spec.angle:
            mid = 0.5 * (lo[..., j] + hi[..., j])
            v2 = wrap_angle(v, mid)                             # in [mid - 90, mid + 90)
            v = np.where(np.isfinite(v2) & (v2 >= lo[..., j]) & (v2 <= hi[..., j]), v2, v)
        if e.param.prior is None:
            if e.log:
                a, b = np.log10(lo[..., j]), np.log10(hi[..., j])
                m = BOUND_MARGIN * (b - a)
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = np.where(np.isfinite(v), 10.0 ** np.clip(np.log10(v), a + m, b - m), v)
            else:
                m = BOUND_MARGIN * (hi[..., j] - lo[..., j])
                v = np.clip(v, lo[..., j] + m, hi[..., j] - m)
        values[..., i] = v
    return values


def _one_jacobian(model: Model, values, gal: GalaxyArrays):
    """(Jᵀ W J, G = identity) of one galaxy, J w.r.t. the free values in user units."""
    free = jnp.asarray(model.free)

    def pixels(v):
        return model.render(values.at[free].set(v), gal).reshape(-1)

    jac = jax.jacfwd(pixels)(values[free])                      # (N, S)
    w = (gal.weight / jnp.square(gal.sigma)).reshape(-1)
    mat = jnp.einsum("ns,n,nt->st", jac, w, jac)
    return mat, jnp.eye(len(model.free), dtype=mat.dtype)


def _unconstrained(model: Model, values, gal: GalaxyArrays):
    sites = model.site_values(values, gal)
    z = unconstrain_fn(model.numpyro_model, (gal,), _NONE, sites)
    return jax.flatten_util.ravel_pytree(z)


def _to_free_values(model: Model, gal: GalaxyArrays, unravel, free_only: bool = True):
    """Flat unconstrained z → the free values (or, ``free_only=False``, every entry)."""
    free = jnp.asarray(model.free)

    def fn(x):
        sites = constrain_fn(model.numpyro_model, (gal,), _NONE, unravel(x))
        values = model.values_from_sites(sites, gal)
        return values[free] if free_only else values
    return fn


def _hessian_by_hvp(fn, x):
    """Hessian of the scalar ``fn`` at ``x`` as ``S`` Hessian-vector products (forward over
    reverse), one direction after another (``lax.map``). Same numbers as ``jax.hessian``;
    on a CPU ~2.5× faster for the batched image models here, whose vectorised second-order
    tangents of every sub-pixel sample do not fit in cache."""
    grad = jax.grad(fn)
    return jax.lax.map(lambda e: jax.jvp(grad, (x,), (e,))[1], jnp.eye(x.shape[0], dtype=x.dtype))


def _one_hessian(model: Model, values, gal: GalaxyArrays, z_fit=None, gn_fit=None):
    """(Hessian of the Gaussian potential energy in unconstrained z, G = ∂values/∂z) of one
    galaxy, assembled from its exact parts; with ``z_fit, gn_fit`` (the MAP fit's final point
    and its JᵀJ there) also whether ``values`` is that point, in which case ``gn_fit`` is
    used for JᵀJ instead of a new Jacobian.

    With whitened residuals ``ρ(z) = √w (D − M(z))``, ``w = Ω/σ²``, the potential energy is
    ``U = ½‖ρ‖² + P(z)`` (``P`` the prior potential including numpyro's log-Jacobian), so ::

        ∇²U = JᵀJ − Σ_pix c ∇²M + ∇²P,     J = ∂ρ/∂z,  c = w (D − M).

    ``M = K ⊛ A(z) + B(z)`` (``A`` the components to convolve, ``B`` the others) is linear
    in ``A``, so ``Σ c ∇²(K ⊛ A) = ∇²(Σ u·A)`` with ``u = Kᵀc`` (the PSF adjoint of the
    weighted residuals, one FFT): the second-order term needs no FFT. ``JᵀJ`` is one
    forward pass per parameter (as for method "jacobian"). Equals ``jax.hessian`` of
    ``numpyro.infer.util.potential_energy`` to float32 rounding (``tests/test_laplace.py``).
    """
    flat, unravel = _unconstrained(model, values, gal)
    to_values = _to_free_values(model, gal, unravel, free_only=False)

    def residuals(x):
        return model.residuals(to_values(x), gal)

    if gn_fit is None:
        jac = jax.jacfwd(residuals)(flat)                               # (N, S)
        gauss_newton = jac.T @ jac
    else:
        gauss_newton = gn_fit
    # c = w (D − M) = √w ρ; u = Kᵀc (the convolution is linear: its adjoint is the vjp at 0)
    c = jnp.sqrt(gal.weight) / gal.sigma * residuals(flat).reshape(gal.image.shape)
    zeros = jnp.zeros(model.canvas_shape(gal), jnp.float32)   # convolved parts live on the padded canvas
    u = jax.vjp(lambda a: model.convolve(a, None, gal), zeros)[1](c)[0]

    def weighted_model(x):      # Σ c·M(x) with the convolution moved onto the weights
        conv, point_hat, direct = model.render_parts(to_values(x), gal)
        out = jnp.float32(0.0)
        if conv is not None:
            out = out + jnp.sum(u * conv)
        if point_hat is not None:
            out = out + jnp.sum(c * model.convolve(None, point_hat, gal))
        if direct is not None:
            out = out + jnp.sum(c * direct)
        return out

    def prior(x):
        return potential_energy(model.numpyro_model, (gal,), _NONE, unravel(x))

    hess = gauss_newton - _hessian_by_hvp(weighted_model, flat) + jax.hessian(prior)(flat)
    g = jax.jacfwd(_to_free_values(model, gal, unravel))(flat)   # (S values, S z)
    if gn_fit is None:
        return hess, g
    # the same point up to the float32 round trip values -> z (worst at the bound margin)
    same = jnp.all(jnp.isfinite(gn_fit)) & jnp.all(jnp.abs(flat - z_fit) <= 1e-3 * (1.0 + jnp.abs(z_fit)))
    return hess, g, same


def _one_loglike_curvature(model: Model, values, gal: GalaxyArrays):
    free = jnp.asarray(model.free)

    def negll(v):
        c2 = model.chi2(values.at[free].set(v), gal)
        return jnp.stack([-model.loglike_from_chi2(c2, gal, "gaussian"),
                          -model.loglike_from_chi2(c2, gal, "chi2")])

    hess = jax.jacfwd(jax.jacrev(negll))(values[free])            # (2, S, S)
    return hess[0], hess[1]


def _compiled(model: Model, what: str):
    """The vmapped, jitted per-galaxy derivative ``what`` of a model (cached on the model by
    :func:`galbayes.compiled.compiled`)."""
    def build():
        if what == "jacobian":
            fn = lambda v, g: _one_jacobian(model, v, g)            # noqa: E731
        elif what == "hessian":
            fn = lambda v, g: _one_hessian(model, v, g)             # noqa: E731
        elif what == "hessian_reuse":
            fn = lambda v, z, gn, g: _one_hessian(model, v, g, z, gn)   # noqa: E731
        else:  # "curvature"
            fn = lambda v, g: _one_loglike_curvature(model, v, g)   # noqa: E731
        return jax.jit(jax.vmap(fn))

    return compiled(model, ("laplace", what), build)


def _run_batched(fn, arrays, batch, batch_size):
    """``fn(*arrays, batch)`` (arrays: per-galaxy float arrays, leading axis B) in chunks of
    ``batch_size`` galaxies (the last one padded, so one compiled shape serves all)."""
    arrays = tuple(np.asarray(a) for a in arrays)
    n = arrays[0].shape[0]

    def call(idx, sub):
        return jax.device_get(fn(*(jnp.asarray(a[idx], jnp.float32) for a in arrays), sub))
    if batch_size is None or batch_size >= n:
        return call(np.arange(n), batch)
    outs = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])   # one compiled shape
        sub = jax.tree_util.tree_map(lambda a: a[idx], batch)
        out = call(idx, sub)
        outs.append(jax.tree_util.tree_map(lambda a: a[: min(batch_size, n - start)], out))
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)


# --------------------------------------------------------------------------- inversion
def invert_curvature(mat, jac=None, *, keys, free_values=None, lo=None, hi=None, log=None,
                     eig_tol: float = EIG_TOL, zero_diag_means: str = "no effect on the image"):
    """Invert one galaxy's curvature matrix in float64 with flags.

    Parameters
    ----------
    mat : (S, S) curvature (Fisher) matrix in the coordinates of its rows.
    jac : (S, S), optional
        ``∂values/∂coords``; the covariance is ``jac mat⁻¹ jacᵀ`` (identity if omitted).
    keys : list of str
        Names of the free parameters (for the flag text).
    free_values, lo, hi, log : optional
        Values and prior bounds of the free parameters, and which are log-sampled: enable
        the "unconstrained by the data" and "at prior bound" flags.

    Returns
    -------
    (errors (S,), covariance (S, S), flag str)
    """
    mat = np.asarray(mat, np.float64)
    s = mat.shape[0]
    jac = np.eye(s) if jac is None else np.asarray(jac, np.float64)
    problems = []
    if not (np.all(np.isfinite(mat)) and np.all(np.isfinite(jac))):
        return np.full(s, np.nan), np.full((s, s), np.nan), "covariance not finite"
    mat = 0.5 * (mat + mat.T)
    diag = np.diag(mat).copy()
    # Normalise to unit diagonal (the units of the parameters differ by orders of magnitude)
    # and invert by eigen-decomposition; a zero diagonal is a coordinate with no effect at
    # all, a tiny eigenvalue a degenerate combination.
    scale = np.sqrt(np.abs(diag))
    zero = diag <= 0.0
    good = ~zero
    bad_coord = zero.copy()
    cov_c = np.zeros((s, s))
    nonpd = bool(np.any(diag < 0.0))
    if np.any(good):
        d = scale[good]
        r = mat[np.ix_(good, good)] / np.outer(d, d)
        lam, vec = np.linalg.eigh(r)
        bad_dir = lam <= eig_tol
        nonpd = nonpd or bool(np.any(lam < -eig_tol))
        if np.any(bad_dir):
            involved = np.any(np.abs(vec[:, bad_dir]) > 0.2, axis=1)
            idx = np.flatnonzero(good)
            bad_coord[idx[involved]] = True
        ok = ~bad_dir
        inv = (vec[:, ok] / lam[ok]) @ vec[:, ok].T
        cov_c[np.ix_(good, good)] = inv / np.outer(d, d)
    # Map to user units; anything touched by a bad coordinate is undetermined.
    bad_val = (np.abs(jac) > 0) @ bad_coord.astype(float) > 0
    cov = jac @ cov_c @ jac.T
    if np.any(bad_val):
        cov[bad_val, :] = np.nan
        cov[:, bad_val] = np.nan
        cov[bad_val, bad_val] = np.inf
        names = ", ".join(k for k, b in zip(keys, bad_val) if b)
        if np.any(zero & (diag == 0.0)) and not nonpd and not np.any(bad_coord & ~zero):
            problems.append(f"covariance singular: {names} ({zero_diag_means})")
        elif nonpd:
            problems.append(f"covariance not positive definite: {names}")
        else:
            problems.append(f"covariance singular: {names} (degenerate)")
    err = np.sqrt(np.where(bad_val, np.inf, np.clip(np.diag(cov), 0.0, None)))
    if free_values is not None and lo is not None and hi is not None:
        v = np.asarray(free_values, np.float64)
        lo = np.asarray(lo, np.float64)
        hi = np.asarray(hi, np.float64)
        log = np.zeros(s, bool) if log is None else np.asarray(log, bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            width = np.where(log, np.log10(hi) - np.log10(lo), hi - lo)
            err_c = np.where(log, err / (np.abs(v) * np.log(10.0)), err)
            pos = np.where(log, (np.log10(v) - np.log10(lo)) / width, (v - lo) / width)
        dominated = ~bad_val & np.isfinite(err_c) & (err_c > PRIOR_FRACTION * width)
        if np.any(dominated):
            problems.append("unconstrained by the data (error > 1/4 of the prior range): "
                            + ", ".join(k for k, b in zip(keys, dominated) if b))
        at_bound = (pos < BOUND_TOL) | (pos > 1.0 - BOUND_TOL)
        if np.any(at_bound):
            problems.append("at prior bound: " + ", ".join(k for k, b in zip(keys, at_bound) if b))
    return err, cov, join_problems(problems)


# --------------------------------------------------------------------------- public API
def laplace_errors(model: Model, batch: GalaxyArrays, values, *, method: str = "hessian",
                   batch_size: int | None = None) -> LaplaceResult:
    """1σ errors and covariances of a batch of galaxies at their MAP.

    Parameters
    ----------
    model : Model
    batch : GalaxyArrays
        Stacked galaxies (leading axis B).
    values : MapResult or (B, E) array
        The fit (:func:`~galbayes.inference.fit_map`'s result), or every entry at the MAP in
        user units (``MapResult.values``). Given the fit, method ``"hessian"`` reuses the
        Gauss–Newton matrix JᵀJ of its last LM step, computed at the very point returned,
        and only adds the second-order and prior terms (same numbers to float32 rounding,
        ~40% of the cost); galaxies without it (``polish="none"``) or whose values were
        changed get JᵀJ computed afresh.
    method : {"hessian", "jacobian"}
        ``"hessian"``: numpyro Laplace (inverse Hessian of the Gaussian-likelihood
        potential energy in unconstrained space, delta-method to user units);
        ``"jacobian"``: the paper's ``(JᵀWJ)⁻¹`` in user units.
    batch_size : int, optional
        Galaxies per jitted call (bounds memory for big stamps); default all at once.

    Returns
    -------
    LaplaceResult
        ``(errors (B, E), covariance (B, S, S), flags)``.
    """
    if method not in ("hessian", "jacobian"):
        raise OptionsError(f"method must be 'hessian' or 'jacobian', got {method!r}")
    fit = values if isinstance(values, MapResult) else None
    if fit is not None:
        values = fit.values
    batch = jax.tree_util.tree_map(np.asarray, batch)
    values = values_into_bounds(model, batch, np.atleast_2d(np.asarray(values, np.float64)))
    if method == "hessian" and fit is not None and fit.gauss_newton is not None \
            and np.any(np.isfinite(fit.gauss_newton).all(axis=(1, 2))):
        mats, jacs, same = _run_batched(_compiled(model, "hessian_reuse"),
                                        (values, fit.unconstrained, fit.gauss_newton), batch, batch_size)
        redo = np.flatnonzero(~np.asarray(same, bool))
        if redo.size:
            sub = jax.tree_util.tree_map(lambda a: a[redo], batch)
            m2, j2 = _run_batched(_compiled(model, method), (values[redo],), sub, batch_size)
            mats, jacs = np.array(mats), np.array(jacs)
            mats[redo], jacs[redo] = m2, j2
    else:
        mats, jacs = _run_batched(_compiled(model, method), (values,), batch, batch_size)
    return _assemble(model, batch, values, mats, jacs, method)


def _assemble(model, batch, values, mats, jacs, method):
    b, s = values.shape[0], model.n_free
    errors = np.zeros((b, len(model.keys)))
    cov = np.zeros((b, s, s))
    flags = []
    free = np.asarray(model.free)
    log = model.log_sampled
    zero_note = "no effect on the image" if method == "jacobian" else "zero curvature"
    for j in range(b):
        err, c, flag = invert_curvature(mats[j], None if method == "jacobian" else jacs[j],
                                        keys=model.free_keys, free_values=values[j, free],
                                        lo=batch.lo[j], hi=batch.hi[j], log=log,
                                        zero_diag_means=zero_note)
        errors[j, free] = err
        cov[j] = c
        flags.append(flag)
    return LaplaceResult(errors, cov, flags)


def loglike_curvature(model: Model, batch: GalaxyArrays, values) -> dict:
    """Hessians of −ln L (no prior) w.r.t. the free parameters in user units, per galaxy.

    Returns ``{"gaussian": (B, S, S), "chi2": (B, S, S)}`` for the two pixel likelihoods,
    computed by automatic differentiation of the likelihood code itself; used to show that
    the χ²-distribution curvature is ~1/k of the Gaussian one (module docstring).
    """
    batch = jax.tree_util.tree_map(np.asarray, batch)
    values = np.atleast_2d(np.asarray(values, np.float64))
    gauss, chi2 = _compiled(model, "curvature")(jnp.asarray(values, jnp.float32),
                                                jax.tree_util.tree_map(jnp.asarray, batch))
    return {"gaussian": np.asarray(gauss, np.float64), "chi2": np.asarray(chi2, np.float64)}

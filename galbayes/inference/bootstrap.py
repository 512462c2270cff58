"""Bootstrap error bars (paper §5.2): resample pixels with replacement, refit, take the scatter.

For each galaxy, ``M`` replicas (default 100) are drawn. A replica resamples the galaxy's
``N`` unmasked pixels with replacement, which is the same as giving every pixel an integer
multiplicity ``w ~ Multinomial(N, uniform over the unmasked pixels)``; the multiplicities
multiply the mask Ω (``χ² = Σ w Ω (D − M)²/σ²``), so a replica is just the galaxy with
another weight map and the model, renderer and fitter are unchanged. Every replica is
refitted with galbayes' MAP fitter — a Levenberg–Marquardt polish (``fit_map`` with
``max_iter=0``) started from the galaxy's MAP — and all replicas of all galaxies are entries
of the same batches (each galaxy with its own resampling). Every free parameter stays free
(the centre is not fixed).

The error is the paper's ``σ² = (1/M) Σ (m_i − m̄)²`` over the replicas that converged to
finite values (position angles are unwrapped about the MAP first); the covariance is the
same average of outer products.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from ..errors import OptionsError
from ..model import GalaxyArrays, Model
from ..params import wrap_angle
from ..status import join_problems
from .laplace import values_into_bounds
from .map import MapOptions, fit_map

__all__ = ["BootstrapResult", "bootstrap_errors", "bootstrap_weights"]


class BootstrapResult(NamedTuple):
    """Per-galaxy bootstrap errors (the first three fields match :class:`LaplaceResult`).

    errors : (B, E) 1σ of every entry in user units (0 for fixed entries).
    covariance : (B, S, S) of the free parameters (``model.free_keys`` order).
    flags : list of B strings, ``"ok"`` or what went wrong.
    samples : (B, M, E) the refitted values (NaN for failed replicas; angles unwrapped
        about the MAP).
    n_good : (B,) replicas used.
    """

    errors: np.ndarray
    covariance: np.ndarray
    flags: list
    samples: np.ndarray
    n_good: np.ndarray


def bootstrap_weights(weight, n_boot: int, rng) -> np.ndarray:
    """``n_boot`` resampled weight maps of one galaxy: Ω × multinomial pixel multiplicities."""
    weight = np.asarray(weight)
    flat = weight.reshape(-1)
    use = np.flatnonzero(flat > 0)
    counts = rng.multinomial(len(use), np.full(len(use), 1.0 / len(use)), size=n_boot)
    out = np.zeros((n_boot, flat.size), np.float32)
    out[:, use] = counts * flat[use]
    return out.reshape((n_boot,) + weight.shape)


def bootstrap_errors(model: Model, batch: GalaxyArrays, values, *, n_boot: int = 100, seed: int = 0,
                     batch_size: int = 256, options: MapOptions | None = None,
                     min_good: float = 0.8) -> BootstrapResult:
    """Bootstrap 1σ errors of a batch of galaxies at their MAP.

    Parameters
    ----------
    model : Model
    batch : GalaxyArrays
        Stacked galaxies (leading axis B).
    values : (B, E)
        Every entry at the MAP in user units (``MapResult.values``).
    n_boot : int
        Replicas per galaxy (the paper's M, typically 100).
    seed : int
        Seed of the resampling; galaxy ``b`` uses the stream ``(seed, b)``.
    batch_size : int
        Replicas per jitted fit (replicas of several galaxies share a batch).
    options : MapOptions, optional
        Fitter settings; SVI is always skipped (``max_iter=0``) and the LM polish used.
    min_good : float
        Flag a galaxy when fewer than this fraction of its replicas converged.
    """
    if n_boot < 2:
        raise OptionsError("n_boot must be >= 2")
    opts = options or MapOptions()
    opts = MapOptions(**{**opts.__dict__, "max_iter": 0, "polish": "lm"})
    batch = jax.tree_util.tree_map(np.asarray, batch)
    values = values_into_bounds(model, batch, np.atleast_2d(np.asarray(values, np.float64)))
    n_gal, n_ent = values.shape
    free = np.asarray(model.free)
    angle = np.array([e.spec.angle for e in model.entries])

    pairs = [(b, m) for b in range(n_gal) for m in range(n_boot)]
    samples = np.full((n_gal, n_boot, n_ent), np.nan)
    converged = np.zeros((n_gal, n_boot), bool)
    weights_cache: dict = {}

    def weights_of(b):
        if b not in weights_cache:
            weights_cache.clear()
            rng = np.random.default_rng([seed, b])
            weights_cache[b] = bootstrap_weights(batch.weight[b], n_boot, rng)
        return weights_cache[b]

    size = min(batch_size, len(pairs))
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        chunk = chunk + [chunk[-1]] * (size - len(chunk))        # one compiled shape
        gi = np.array([b for b, _ in chunk])
        w = np.stack([weights_of(b)[m] for b, m in chunk])
        sub = jax.tree_util.tree_map(lambda a: a[gi], batch)
        sub = sub._replace(weight=w, values0=values[gi].astype(np.float32))
        res = fit_map(model, sub, options=opts)
        n_real = min(size, len(pairs) - start)
        for j in range(n_real):
            b, m = chunk[j]
            samples[b, m] = res.values[j]
            converged[b, m] = bool(np.all(np.isfinite(res.values[j])))

    # Unwrap angles about the MAP (fit_map wraps them into [-90°, 90°)).
    for i in np.flatnonzero(angle):
        samples[:, :, i] = wrap_angle(samples[:, :, i], values[:, None, i])

    errors = np.zeros((n_gal, n_ent))
    cov = np.full((n_gal, len(free), len(free)), np.nan)
    flags, n_good = [], np.zeros(n_gal, int)
    for b in range(n_gal):
        ok = converged[b]
        n_good[b] = int(ok.sum())
        problems = []
        if n_good[b] < 2:
            errors[b, free] = np.nan
            flags.append("bootstrap failed: fewer than 2 replicas converged")
            continue
        x = samples[b, ok][:, free]
        dev = x - x.mean(axis=0)
        cov[b] = dev.T @ dev / len(x)
        errors[b, free] = np.sqrt(np.diag(cov[b]))
        if n_good[b] < min_good * n_boot:
            problems.append(f"bootstrap: only {n_good[b]}/{n_boot} replicas converged")
        flags.append(join_problems(problems))
    return BootstrapResult(errors, cov, flags, samples, n_good)

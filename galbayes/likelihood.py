"""Pixel likelihoods: the paper's χ²-distribution (eq. 17–18) and the Gaussian.

Both depend on the model only through χ² = Σ Ω (D − M)² / σ² (eq. 18), Ω the pixel weights
(1 = use the pixel, 0 = masked).

* ``"chi2"`` (default, eq. 17): ln L = −(k/2) ln 2 − ln Γ(k/2) + (k/2 − 1) ln χ² − χ²/2,
  k = unmasked pixels − free parameters. As a function of χ² it peaks at χ² = k − 2, so
  when the best fit has χ² < k − 2 its maxima form a shell around the χ² minimum. galbayes'
  MAP point estimate is therefore always the χ² minimum (see :mod:`galbayes.inference.map`).
* ``"gaussian"``: ln L = −χ²/2 − Σ Ω ln(σ √(2π)).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import gammaln

from .errors import OptionsError

LIKELIHOODS = ("chi2", "gaussian")


def chi2(data, model, sigma, weight):
    """χ² of eq. 18 over the last two axes."""
    return jnp.sum(weight * jnp.square((data - model) / sigma), axis=(-2, -1))


def chi2_distribution_loglike(chi2_value, k):
    """ln of the χ² distribution with ``k`` degrees of freedom at ``chi2_value`` (eq. 17)."""
    half_k = 0.5 * k
    # Written about χ² = k so that the χ²-dependent part stays O(1) in float32; the plain sum
    # cancels terms of size ~k ln k and is noisy by ~0.01 at k ~ 16000 (0.1 at k ~ 1e5).
    const = -half_k * jnp.log(2.0) - gammaln(half_k) + (half_k - 1.0) * jnp.log(k) - 0.5 * k
    return const + (half_k - 1.0) * jnp.log(chi2_value / k) - 0.5 * (chi2_value - k)


def gaussian_loglike(chi2_value, sigma, weight):
    """Independent Gaussian pixels: −χ²/2 − Σ Ω ln(σ √(2π))."""
    return -0.5 * chi2_value - jnp.sum(weight * jnp.log(sigma * jnp.sqrt(2.0 * jnp.pi)), axis=(-2, -1))


def check_likelihood(name: str) -> str:
    if name not in LIKELIHOODS:
        raise OptionsError(f"unknown likelihood {name!r}; choose one of {LIKELIHOODS}")
    return name

"""Special functions the profiles need, written for JAX (jit, vmap, grad).

JAX has no ``gammaincinv``; :func:`sersic_nu` evaluates the Sérsic ν_n (GALFIT's b_n),
the root of P(2n, ν) = 1/2, from a Chebyshev expansion of ν/n in log n generated in float64
by ``tools/gen_sersic_nu.py`` (relative error < 1e-6 in float32 for n in [0.2, 10]).
Outside that range it falls back to Newton iterations on ``jax.scipy.special.gammainc``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import gammainc, gammaln

from ._sersic_nu_coeffs import COEFFS, N_MAX, N_MIN

_LOG_LO, _LOG_HI = math.log(N_MIN), math.log(N_MAX)


def _clenshaw(t, coeffs):
    b1 = jnp.zeros_like(t)
    b2 = jnp.zeros_like(t)
    for c in coeffs[:0:-1]:
        b1, b2 = 2.0 * t * b1 - b2 + c, b1
    return t * b1 - b2 + coeffs[0]


def _nu_newton(n, iterations=12):
    """ν_n by Newton steps on P(2n, ν) − 1/2, from Ciotti & Bertin / MacArthur guesses."""
    a = 2.0 * n
    guess_large = 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n**2)
    guess_small = 0.01945 - 0.8902 * n + 10.95 * n**2 - 19.67 * n**3 + 13.43 * n**4
    b = jnp.where(n > 0.36, guess_large, jnp.maximum(guess_small, 1e-3))

    def step(_, b):
        f = gammainc(a, b) - 0.5
        log_dfdb = (a - 1.0) * jnp.log(b) - b - gammaln(a)
        return jnp.maximum(b - f * jnp.exp(-log_dfdb), 0.5 * b)

    return lax.fori_loop(0, iterations, step, b)


@jax.custom_jvp
def _nu_newton_implicit(n):
    """:func:`_nu_newton` with an implicit-function derivative, so that it is twice
    differentiable (JAX has no derivative rule for ``igamma_grad_a``, which AD through the
    Newton steps would need at second order; ``jax.hessian`` of any Sérsic model traced it)."""
    return _nu_newton(n)


@_nu_newton_implicit.defjvp
def _nu_newton_implicit_jvp(primals, tangents):
    (n,), (dn,) = primals, tangents
    nu = _nu_newton_implicit(n)
    a = 2.0 * n
    # P(2n, ν) = 1/2  ⇒  dν/dn = −2 ∂P/∂a / ∂P/∂x. ∂P/∂a is held constant under further
    # differentiation (second derivatives outside [N_MIN, N_MAX] omit its change).
    a_s, nu_s = lax.stop_gradient(a), lax.stop_gradient(nu)
    dpa = jax.jvp(lambda aa: gammainc(aa, nu_s), (a_s,), (jnp.ones_like(a_s),))[1]
    dpx = jnp.exp((a - 1.0) * jnp.log(nu) - nu - gammaln(a))
    return nu, -2.0 * dpa / dpx * dn


@jax.jit  # eager callers (render_model) would otherwise recompile the Newton loop per call
def sersic_nu(n):
    """Sérsic ν_n (b_n): the solution of P(2n, ν) = 1/2, differentiable in ``n``.

    Parameters
    ----------
    n : array_like
        Sérsic index, > 0.

    Returns
    -------
    jax.Array
        ν_n, same shape as ``n``.
    """
    n = jnp.asarray(n)
    inside = (n >= N_MIN) & (n <= N_MAX)
    # jnp.where, not jnp.clip: clip halves the gradient at exactly n = N_MIN or N_MAX.
    n_in = jnp.where(inside, n, 1.0)
    t = (2.0 * jnp.log(n_in) - _LOG_LO - _LOG_HI) / (_LOG_HI - _LOG_LO)
    cheb = n_in * _clenshaw(t, COEFFS)
    n_out = jnp.where(inside, 1.0, n)  # keep the unused branch finite
    return jnp.where(inside, cheb, _nu_newton_implicit(n_out))


def beta_fn(a, b):
    """The Beta function B(a, b) = Γ(a)Γ(b)/Γ(a+b)."""
    return jnp.exp(gammaln(a) + gammaln(b) - gammaln(a + b))


def r_box(box):
    """Area factor of a generalised ellipse with boxiness B (paper eq. 6); 1 at B = 0.

    ``r_box = π (2+B) / (2 β(1/(2+B), 1/(2+B)))``. Dividing the elliptical flux integral by
    it gives the flux inside the boxy isophote, so ``I ∝ r_box · F``.
    """
    c = 2.0 + box
    return jnp.pi * c / (2.0 * beta_fn(1.0 / c, 1.0 / c))

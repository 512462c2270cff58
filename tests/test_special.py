"""galbayes.special: the Sérsic ν_n (b_n) and the boxy-ellipse area factor r_box."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

import galbayes
from galbayes.special import beta_fn, r_box, sersic_nu

# Dense grid over the documented accuracy range, including both ends exactly.
N_GRID = np.concatenate([np.linspace(0.2, 10.0, 4001), np.geomspace(0.2, 10.0, 1001)]).astype(np.float32)


def _nu_ref(n):
    """Reference ν_n in float64 at the float32 values of n actually passed to JAX."""
    return special.gammaincinv(2.0 * np.asarray(n, np.float64), 0.5)


def test_sersic_nu_is_exported():
    assert galbayes.sersic_nu is sersic_nu


def test_sersic_nu_matches_scipy_on_dense_grid():
    nu = np.asarray(sersic_nu(jnp.asarray(N_GRID)))
    assert nu.dtype == np.float32
    rel = np.abs(nu / _nu_ref(N_GRID) - 1.0)
    assert rel.max() <= 1e-6, f"max relative error {rel.max():.3g} at n={N_GRID[np.argmax(rel)]}"


def test_sersic_nu_known_values():
    # b_1 = 1.678347 (exponential), b_4 = 7.669249 (de Vaucouleurs), b_0.5 = ln 2 (Gaussian).
    nu = np.asarray(sersic_nu(jnp.asarray([0.5, 1.0, 4.0], jnp.float32)))
    np.testing.assert_allclose(nu, [np.log(2.0), 1.6783469900166608, 7.669249442500805], rtol=1e-6)


def test_sersic_nu_works_under_jit_and_vmap():
    n = jnp.asarray([0.3, 1.7, 5.5, 9.9], jnp.float32)
    a = jax.jit(sersic_nu)(n)
    b = jax.vmap(sersic_nu)(n)
    np.testing.assert_allclose(np.asarray(a), _nu_ref(n), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b), _nu_ref(n), rtol=1e-6)


OUTSIDE = np.array([0.05, 0.1, 0.15, 0.199, 10.01, 12.0, 15.0, 20.0], np.float32)


def test_sersic_nu_outside_documented_range():
    nu = np.asarray(sersic_nu(jnp.asarray(OUTSIDE)))
    assert np.all(np.isfinite(nu))
    rel = np.abs(nu / _nu_ref(OUTSIDE) - 1.0)
    assert rel.max() <= 1e-4, f"max relative error {rel.max():.3g} at n={OUTSIDE[np.argmax(rel)]}"


def _fd_dnu_dn(n, h=1e-6):
    n = np.asarray(n, np.float64)
    return (special.gammaincinv(2.0 * (n + h), 0.5) - special.gammaincinv(2.0 * (n - h), 0.5)) / (2.0 * h)


def test_sersic_nu_gradient_matches_finite_difference_of_scipy():
    # Includes the two ends of the Chebyshev range exactly (n = 0.2 and n = 10).
    n = np.concatenate([np.linspace(0.2, 10.0, 981), [0.2, 10.0]]).astype(np.float32)
    g = np.asarray(jax.vmap(jax.grad(sersic_nu))(jnp.asarray(n)))
    assert np.all(np.isfinite(g))
    rel = np.abs(g / _fd_dnu_dn(n) - 1.0)
    assert rel.max() <= 1e-4, f"max relative gradient error {rel.max():.3g} at n={n[np.argmax(rel)]}"


def test_sersic_nu_gradient_outside_range():
    n = np.array([0.1, 0.15, 0.19, 10.5, 12.0, 15.0], np.float32)
    g = np.asarray(jax.vmap(jax.grad(sersic_nu))(jnp.asarray(n)))
    assert np.all(np.isfinite(g))
    rel = np.abs(g / _fd_dnu_dn(n) - 1.0)
    assert rel.max() <= 1e-3, f"max relative gradient error {rel.max():.3g} at n={n[np.argmax(rel)]}"


def test_beta_fn_matches_scipy():
    a = np.array([0.3, 0.5, 1.0, 2.5, 7.0], np.float32)
    b = np.array([0.25, 1.0, 3.0, 0.6, 2.0], np.float32)
    np.testing.assert_allclose(np.asarray(beta_fn(a, b)), special.beta(a.astype(np.float64), b.astype(np.float64)),
                               rtol=2e-5)


def _superellipse_area(box):
    """Area of |x|^(2+B) + |y|^(2+B) <= 1 by quadrature: 4 ∫_0^1 (1 - x^p)^(1/p) dx."""
    p = 2.0 + box
    val, _ = integrate.quad(lambda x: (1.0 - x**p) ** (1.0 / p), 0.0, 1.0, epsabs=0, epsrel=1e-12, limit=200)
    return 4.0 * val


def test_r_box_is_one_for_an_ellipse():
    assert float(r_box(0.0)) == pytest.approx(1.0, rel=1e-6)
    assert _superellipse_area(0.0) == pytest.approx(np.pi, rel=1e-10)  # the reference itself


@pytest.mark.parametrize("box", [-0.9, -0.5, -0.2, 0.3, 0.5, 1.0, 1.5, 3.0])
def test_r_box_equals_pi_over_superellipse_area(box):
    expected = np.pi / _superellipse_area(box)
    assert float(r_box(jnp.float32(box))) == pytest.approx(expected, rel=1e-5)


def test_r_box_gradient_is_finite_and_matches_finite_difference():
    for box in (-0.5, 0.0, 0.7):
        g = float(jax.grad(r_box)(jnp.float32(box)))
        h = 1e-5
        fd = (np.pi / _superellipse_area(box + h) - np.pi / _superellipse_area(box - h)) / (2 * h)
        assert np.isfinite(g)
        assert g == pytest.approx(fd, rel=1e-3, abs=1e-6)

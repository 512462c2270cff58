"""Likelihoods: χ² (eq. 18) with a mask, the χ²-distribution ln L (eq. 17) with
k = unmasked pixels − free parameters, and the Gaussian pixel likelihood."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

import galbayes as gb
from galbayes import likelihood as lk


def eq17(chi2, k):
    """ln L = −(k/2) ln 2 − ln Γ(k/2) + (k/2 − 1) ln χ² − χ²/2, in float64."""
    return -(k / 2) * math.log(2.0) - special.gammaln(k / 2) + (k / 2 - 1) * math.log(chi2) - chi2 / 2


EPS32 = float(np.finfo(np.float32).eps)


def eq17_tolerance(chi2, k):
    """float32 rounding bound: a few ulps of the largest terms of eq. 17 (they cancel)."""
    terms = [(k / 2) * math.log(2.0), special.gammaln(k / 2), (k / 2 - 1) * math.log(chi2), chi2 / 2]
    return 8 * EPS32 * sum(abs(t) for t in terms)


@pytest.mark.parametrize("chi2, k", [(10.0, 12.0), (3.7, 2.5), (480.0, 500.0), (2100.0, 1995.0), (50.0, 7.0),
                                     (16000.0, 16384.0)])
def test_chi2_distribution_loglike_is_eq17(chi2, k):
    got = float(lk.chi2_distribution_loglike(jnp.float32(chi2), jnp.float32(k)))
    tol = eq17_tolerance(chi2, k)
    assert got == pytest.approx(eq17(chi2, k), rel=0, abs=tol)
    # eq. 17 is the log pdf of the χ² distribution with k degrees of freedom
    assert got == pytest.approx(stats.chi2.logpdf(chi2, k), rel=0, abs=tol)


@pytest.mark.parametrize("k, max_spread", [(500.0, 1e-4), (16384.0, 1e-3), (100000.0, 2e-2)])
def test_chi2_distribution_loglike_is_smooth_in_chi2(k, max_spread):
    """Differences of ln L between χ² values (what samplers and optimisers see) are exact to
    ~1e-3 in float32 even for large images, not buried in rounding noise of the k ln k terms."""
    c2 = (k * np.linspace(0.9, 1.1, 401)).astype(np.float32)
    got = np.asarray(lk.chi2_distribution_loglike(jnp.asarray(c2), jnp.float32(k)), np.float64)
    ref = np.array([eq17(float(c), k) for c in c2])
    err = got - ref
    assert np.ptp(err) < max_spread, f"rounding noise {np.ptp(err):.3g} in ln L"
    # and the gradient in χ² is (k/2 − 1)/χ² − 1/2
    g = np.asarray(jax.vmap(jax.grad(lk.chi2_distribution_loglike), (0, None))(jnp.asarray(c2), jnp.float32(k)))
    np.testing.assert_allclose(g, (k / 2 - 1) / c2.astype(np.float64) - 0.5, rtol=0, atol=1e-5)


def _random_problem(seed=0, shape=(16, 19)):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=shape)
    model = data + 0.5 * rng.normal(size=shape)
    sigma = rng.uniform(0.3, 2.0, size=shape)
    weight = (rng.random(shape) > 0.25).astype(np.float64)
    return data, model, sigma, weight


def test_chi2_with_mask_matches_numpy():
    data, model, sigma, weight = _random_problem()
    got = float(lk.chi2(*(jnp.asarray(a, jnp.float32) for a in (data, model, sigma, weight))))
    expected = np.sum(weight * (data - model) ** 2 / sigma**2)
    assert got == pytest.approx(expected, rel=1e-5)
    # masked pixels really are ignored
    assert got != pytest.approx(np.sum((data - model) ** 2 / sigma**2), rel=1e-3)


def test_chi2_over_last_two_axes_for_a_batch():
    probs = [_random_problem(seed) for seed in range(3)]
    stacked = [jnp.asarray(np.stack(a), jnp.float32) for a in zip(*probs)]
    got = np.asarray(lk.chi2(*stacked))
    expected = [np.sum(w * (d - m) ** 2 / s**2) for d, m, s, w in probs]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gaussian_loglike_matches_hand_computation():
    data, model, sigma, weight = _random_problem(1)
    c2 = np.sum(weight * (data - model) ** 2 / sigma**2)
    got = float(lk.gaussian_loglike(jnp.float32(c2), jnp.asarray(sigma, jnp.float32), jnp.asarray(weight, jnp.float32)))
    expected = -0.5 * c2 - np.sum(weight * np.log(sigma * np.sqrt(2 * np.pi)))
    assert got == pytest.approx(expected, rel=1e-5)
    # = Σ over unmasked pixels of the normal log pdf
    use = weight > 0
    assert got == pytest.approx(np.sum(stats.norm.logpdf(data[use], model[use], sigma[use])), rel=1e-5)


def test_check_likelihood():
    assert lk.check_likelihood("chi2") == "chi2"
    assert lk.check_likelihood("gaussian") == "gaussian"
    with pytest.raises(ValueError, match="likelihood"):
        lk.check_likelihood("poisson")
    with pytest.raises(ValueError, match="poisson"):
        gb.Model([gb.Component("g", "gaussian", {})], likelihood="poisson")


# ----------------------------------------------------------------------------- via Model
SHAPE = (20, 23)


def _obs_and_model(likelihood="chi2"):
    rng = np.random.default_rng(3)
    image = rng.normal(size=SHAPE) + 5.0
    sigma = rng.uniform(0.5, 1.5, size=SHAPE)
    mask = np.zeros(SHAPE, int)
    mask[:4, :] = 1
    mask[10:12, 5:15] = 7
    psf = np.ones((3, 3))
    obs = gb.Observation(image=image, sigma=sigma, psf=psf, mask=mask, id="g7")
    comps = [gb.Component("disk", "exponential", {"xc": 11.2, "yc": 9.6, "rs": 3.0, "q": 0.7, "pa": 10.0, "mag": 15.0}),
             gb.Component("sky", "sky", {"sky": 4.0})]
    model = gb.Model(comps, likelihood=likelihood)
    return obs, model, image, sigma, (mask == 0).astype(float)


def test_dof_is_unmasked_pixels_minus_free_parameters():
    obs, model, _, _, w = _obs_and_model()
    gal = model.pack(obs)
    # exponential: xc, yc, pa, q, rs, mag free (box fixed at 0); sky: sky
    assert model.n_free == 7
    assert model.free_keys == ["disk_xc", "disk_yc", "disk_pa", "disk_q", "disk_rs", "disk_mag", "sky_sky"]
    assert obs.n_pixels == int(w.sum()) == SHAPE[0] * SHAPE[1] - 4 * SHAPE[1] - 20
    assert float(model.dof(gal)) == w.sum() - 7
    # fixing a parameter raises k by one
    fixed = gb.Model([gb.Component("disk", "exponential", {"xc": 11.2, "yc": 9.6, "rs": 3.0, "q": 0.7, "pa": 10.0,
                                                         "mag": {"init": 15.0, "fixed": True}}),
                      gb.Component("sky", "sky", {"sky": 4.0})])
    assert float(fixed.dof(fixed.pack(obs))) == w.sum() - 6


def test_model_chi2_with_mask_matches_numpy():
    obs, model, image, sigma, w = _obs_and_model()
    gal = jax.tree_util.tree_map(jnp.asarray, model.pack(obs))
    values = gal.values0
    m = np.asarray(model.render(values, gal), np.float64)
    expected = np.sum(w * (image - m) ** 2 / sigma**2)
    assert float(model.chi2(values, gal)) == pytest.approx(expected, rel=1e-5)
    # residuals are the whitened, masked residual vector
    r = np.asarray(model.residuals(values, gal))
    assert np.sum(r.astype(np.float64) ** 2) == pytest.approx(expected, rel=1e-5)
    assert np.all(r.reshape(SHAPE)[w == 0] == 0)


@pytest.mark.parametrize("likelihood", ["chi2", "gaussian"])
def test_loglike_from_chi2(likelihood):
    obs, model, image, sigma, w = _obs_and_model(likelihood)
    gal = jax.tree_util.tree_map(jnp.asarray, model.pack(obs))
    c2 = float(model.chi2(gal.values0, gal))
    k = w.sum() - model.n_free
    expected = {"chi2": eq17(c2, k),
                "gaussian": -0.5 * c2 - np.sum(w * np.log(sigma * np.sqrt(2 * np.pi)))}
    got = float(model.loglike_from_chi2(jnp.float32(c2), gal))
    assert got == pytest.approx(expected[likelihood], rel=1e-5)
    # the explicit argument overrides the model's choice
    other = "gaussian" if likelihood == "chi2" else "chi2"
    got_other = float(model.loglike_from_chi2(jnp.float32(c2), gal, other))
    assert got_other == pytest.approx(expected[other], rel=1e-5)

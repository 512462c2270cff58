"""Model.numpyro_model under numpyro: log density composition, NUTS, SVI + AutoDelta,
jax.vmap over a stacked batch, finite gradients at awkward points, shared parameters."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO, init_to_value
from numpyro.infer.autoguide import AutoDelta
from numpyro.infer.util import log_density

import galbayes as gb

SHAPE = (24, 24)
TRUTH = dict(gal_xc=11.6, gal_yc=12.3, gal_pa=30.0, gal_q=0.7, gal_re=3.0, gal_n=1.5, gal_mag=17.0)
START = dict(xc=12.0, yc=12.0, pa=20.0, q=0.6, re=2.5, n=2.0, mag=17.3)


def _psf():
    y, x = np.mgrid[:7, :7]
    return np.exp(-0.5 * ((x - 3) ** 2 + (y - 3) ** 2) / 1.2**2)


def sersic_model(likelihood="chi2", **over):
    params = dict(START)
    params.update(over)
    return gb.Model([gb.Component("gal", "sersic", params)], likelihood=likelihood)


@functools.lru_cache(maxsize=None)
def _mock_renderer():
    model = sersic_model()
    return model, jax.jit(model.render)


def mock(truth=TRUTH, seed=1, noise=0.02):
    """A noisy 24×24 PSF-convolved Sérsic galaxy rendered by galbayes itself."""
    model, render = _mock_renderer()
    blank = gb.Observation(image=np.zeros(SHAPE), sigma=np.ones(SHAPE), psf=_psf())
    gal = as_jax(model.pack(blank, truth))
    clean = np.asarray(render(gal.values0, gal), np.float64)
    rng = np.random.default_rng(seed)
    sigma = np.full(SHAPE, noise * clean.max())
    return gb.Observation(image=clean + sigma * rng.normal(size=SHAPE), sigma=sigma, psf=_psf(), id=f"mock{seed}")


def as_jax(gal):
    return jax.tree_util.tree_map(jnp.asarray, gal)


def logp(model, gal, sites, likelihood=None):
    return log_density(model.numpyro_model, (gal,), {"likelihood": likelihood}, sites)[0]


@pytest.fixture(scope="module")
def obs():
    return mock()


# ----------------------------------------------------------------------------- composition
@pytest.mark.parametrize("likelihood", ["chi2", "gaussian"])
def test_log_density_is_flat_priors_plus_loglike(obs, likelihood):
    model = sersic_model(likelihood)
    gal = as_jax(model.pack(obs))
    sites = model.site_values(gal.values0, gal)
    assert set(sites) == {"gal_xc", "gal_yc", "gal_pa", "gal_q", "gal_re_log10", "gal_n_log10", "gal_mag"}
    lo, hi = np.asarray(gal.lo, np.float64), np.asarray(gal.hi, np.float64)
    width = np.array([np.log10(h / l) if model.entries[i].log else h - l
                      for i, l, h in zip(model.free, lo, hi)])
    c2 = model.chi2(gal.values0, gal)
    expected = -np.sum(np.log(width)) + float(model.loglike_from_chi2(c2, gal))
    assert float(logp(model, gal, sites)) == pytest.approx(expected, rel=1e-5, abs=1e-3)
    # the prior-only model
    assert float(logp(model, gal, sites, "none")) == pytest.approx(-np.sum(np.log(width)), rel=1e-5)
    # sites → values round trip
    np.testing.assert_allclose(np.asarray(model.values_from_sites(sites, gal)), np.asarray(gal.values0), rtol=1e-5)


# ----------------------------------------------------------------------------- inference
def test_nuts_runs_and_gives_finite_samples(obs):
    model = sersic_model("gaussian")
    gal = as_jax(model.pack(obs))
    kernel = NUTS(model.numpyro_model, max_tree_depth=5,
                  init_strategy=init_to_value(values=model.site_values(gal.values0, gal)))
    mcmc = MCMC(kernel, num_warmup=100, num_samples=100, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), gal)
    samples = mcmc.get_samples()
    for key in model.free_keys:
        v = np.asarray(samples[key])
        assert v.shape == (100,)
        assert np.all(np.isfinite(v)), key
        j = model.free_keys.index(key)
        assert np.all((v >= float(gal.lo[j]) - 1e-4) & (v <= float(gal.hi[j]) + 1e-4)), key
    # the S/N is high: the centre is recovered to a small fraction of a pixel
    assert abs(float(samples["gal_xc"].mean()) - TRUTH["gal_xc"]) < 0.1
    assert abs(float(samples["gal_yc"].mean()) - TRUTH["gal_yc"]) < 0.1


def test_svi_autodelta_loss_decreases(obs):
    model = sersic_model()  # default χ²-distribution likelihood
    gal = as_jax(model.pack(obs))
    guide = AutoDelta(model.numpyro_model, init_loc_fn=init_to_value(values=model.site_values(gal.values0, gal)))
    svi = SVI(model.numpyro_model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(1), 300, gal, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses))
    assert losses[-20:].mean() < losses[:20].mean() - 1.0
    assert losses[-1] < losses[0]
    median = guide.median(result.params)
    assert all(np.isfinite(float(v)) for v in median.values())


def test_map_point_guide_follows_autodelta(obs):
    """galbayes.inference.map._point_guide (built without AutoDelta's prototype run) is
    AutoDelta's guide: same parameter names, start and support, so SVI with either takes the
    same steps (losses and locations equal to float rounding over 100 Adam steps), and the
    optimizer's raw coordinates are the unconstrained sites that numpyro's unconstrain_fn gives."""
    from numpyro.infer.util import unconstrain_fn

    from galbayes.inference.map import _point_guide

    model = sersic_model(likelihood="gaussian")
    gal = as_jax(model.pack(obs))
    auto = AutoDelta(model.numpyro_model, init_loc_fn=init_to_value(values=model.site_values(gal.values0, gal)))
    runs = []
    for guide in (auto, _point_guide(model)):
        svi = SVI(model.numpyro_model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
        runs.append((svi, svi.run(jax.random.PRNGKey(1), 100, gal, progress_bar=False)))
    (svi_a, ra), (svi_p, rp) = runs
    assert sorted(ra.params) == sorted(rp.params)
    np.testing.assert_allclose(np.asarray(rp.losses), np.asarray(ra.losses), rtol=1e-5)
    for k in ra.params:
        np.testing.assert_allclose(float(rp.params[k]), float(ra.params[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    raw = svi_p.optim.get_params(rp.state.optim_state)
    sites = {k[: -len("_auto_loc")]: v for k, v in rp.params.items()}
    unc = unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, sites)
    for k, v in unc.items():
        np.testing.assert_allclose(float(raw[k + "_auto_loc"]), float(v), rtol=1e-4, atol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------- batching
def test_vmap_log_density_over_a_stacked_batch():
    model = sersic_model()
    truths = [dict(TRUTH, gal_xc=11.6 + 0.3 * k, gal_re=3.0 + 0.5 * k, gal_mag=17.0 + 0.2 * k) for k in range(3)]
    inits = [None, {"gal_q": 0.8, "gal_n": 1.0}, {"gal_xc": 12.4, "gal_pa": -10.0}]
    gals = [model.pack(mock(t, seed=10 + k), inits[k]) for k, t in enumerate(truths)]
    batch = gb.Model.stack(gals)
    assert batch.image.shape == (3,) + SHAPE and batch.values0.shape == (3, len(model.keys))
    batch = as_jax(batch)
    rng = np.random.default_rng(4)
    # evaluate at points other than the initial values, different per galaxy
    sites = {}
    for j, key in enumerate(model.free_keys):
        e = model.entries[model.free[j]]
        lo, hi = np.asarray(batch.lo[:, j]), np.asarray(batch.hi[:, j])
        if e.log:
            lo, hi = np.log10(lo), np.log10(hi)
            key = key + "_log10"
        sites[key] = jnp.asarray(lo + (hi - lo) * rng.uniform(0.3, 0.7, size=3), jnp.float32)
    batched = jax.jit(jax.vmap(lambda g, s: logp(model, g, s)))(batch, sites)
    for k in range(3):
        gal_k = as_jax(gals[k])
        single = logp(model, gal_k, {name: v[k] for name, v in sites.items()})
        assert float(batched[k]) == pytest.approx(float(single), rel=1e-5, abs=1e-3)
    # the galaxies really differ
    assert len({round(float(v), 2) for v in batched}) == 3


# ----------------------------------------------------------------------------- gradients
def _grad_sites(model, gal, sites):
    return jax.grad(lambda s: logp(model, gal, s))(sites)


def _assert_finite(grads):
    for k, v in grads.items():
        assert np.isfinite(float(v)), f"non-finite gradient for {k}: {v}"


def test_gradient_finite_with_centre_on_a_pixel_centre(obs):
    model = sersic_model()
    gal = as_jax(model.pack(obs, {"gal_xc": 12.0, "gal_yc": 12.0}))
    sites = model.site_values(gal.values0, gal)
    grads = _grad_sites(model, gal, sites)
    _assert_finite(grads)
    # and it is the right gradient: compare with a central finite difference
    for name in ("gal_xc", "gal_yc", "gal_re_log10", "gal_n_log10"):
        h = 2e-3
        up = float(logp(model, gal, dict(sites, **{name: sites[name] + h})))
        dn = float(logp(model, gal, dict(sites, **{name: sites[name] - h})))
        fd = (up - dn) / (2 * h)
        assert float(grads[name]) == pytest.approx(fd, rel=0.05, abs=0.5), name


def test_gradient_finite_with_centre_on_a_pixel_centre_high_n(obs):
    model = sersic_model()
    gal = as_jax(model.pack(obs, {"gal_xc": 12.0, "gal_yc": 11.0, "gal_n": 8.0, "gal_re": 0.5, "gal_q": 1.0}))
    _assert_finite(_grad_sites(model, gal, model.site_values(gal.values0, gal)))


def test_gradient_finite_at_and_near_the_bounds(obs):
    """Every free site (box included) set to each end of its prior range, exactly and
    1e-4 of the range inside it: finite log density and gradients."""
    model = sersic_model(box={"init": 0.0})  # box free too
    gal = as_jax(model.pack(obs))
    base = model.site_values(gal.values0, gal)
    value_and_grad = jax.jit(jax.value_and_grad(lambda s: logp(model, gal, s)))
    for j, i in enumerate(model.free):
        e = model.entries[i]
        lo, hi = float(gal.lo[j]), float(gal.hi[j])
        name = e.key + ("_log10" if e.log else "")
        if e.log:
            lo, hi = float(np.log10(lo)), float(np.log10(hi))
        for eps in (0.0, 1e-4):
            for bound in (lo + eps * (hi - lo), hi - eps * (hi - lo)):
                value, grads = value_and_grad(dict(base, **{name: jnp.float32(bound)}))
                assert np.isfinite(float(value)), (name, bound)
                _assert_finite(grads)


# ----------------------------------------------------------------------------- sharing
def bulge_disk(**disk_over):
    disk = {"xc": "bulge.xc", "yc": "bulge.yc", "pa": 5.0, "q": 0.5, "rs": 4.0, "mag": 17.5}
    disk.update(disk_over)
    return gb.Model([gb.Component("bulge", "sersic", {"re": 1.5, "n": 3.0, "mag": 18.0, "q": 0.9}),
                     gb.Component("disk", "exponential", disk)])


def test_shared_centre_by_reference():
    model = bulge_disk()
    assert model.free_keys.count("bulge_xc") == 1
    assert "disk_xc" not in model.keys and "disk_yc" not in model.keys
    assert model.n_free == 7 + 4  # sersic: 7, exponential: 6 minus the shared xc, yc
    obs = gb.Observation(image=np.zeros((30, 32)), sigma=np.ones((30, 32)), psf=_psf())
    gal = as_jax(model.pack(obs, {"bulge_xc": 13.3, "bulge_yc": 16.2}))
    # only one xc is sampled
    trace = numpyro.handlers.trace(numpyro.handlers.seed(model.numpyro_model, 0)).get_trace(gal)
    sample_sites = [k for k, v in trace.items() if v["type"] == "sample" and not v["is_observed"]]
    assert [k for k in sample_sites if k.endswith("_xc")] == ["bulge_xc"]
    # ... and the disk is rendered at the bulge's centre: the same image as a lone
    # exponential placed there explicitly
    comps = model.render_components(gal.values0, gal)
    lone = gb.Model([gb.Component("d", "exponential", {"xc": 13.3, "yc": 16.2, "pa": 5.0, "q": 0.5, "rs": 4.0,
                                                       "mag": 17.5})])
    expected = gb.render_model(lone, obs)
    np.testing.assert_allclose(np.asarray(comps["disk"]), expected, rtol=0, atol=1e-6 * expected.max())
    moved = model.render_components(gal.values0.at[model.keys.index("bulge_xc")].set(12.3), gal)
    assert np.abs(np.asarray(moved["disk"]) - expected).max() > 0.1 * expected.max()


def test_shared_param_object_and_single_reference():
    centre = gb.Param(init=15.0, bounds=(10.0, 20.0))
    model = gb.Model([gb.Component("bulge", "sersic", {"xc": centre, "re": 1.5, "mag": 18.0}),
                      gb.Component("disk", "exponential", {"xc": centre, "rs": 4.0, "mag": 17.5})])
    assert [k for k in model.free_keys if k.endswith("_xc")] == ["bulge_xc"]
    model2 = bulge_disk(yc=None)
    assert [k for k in model2.free_keys if k.endswith("_xc")] == ["bulge_xc"]
    assert "disk_yc" in model2.free_keys  # yc not shared this time

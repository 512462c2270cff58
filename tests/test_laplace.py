"""Laplace error bars (galbayes.inference.laplace): calibration on GalSim mocks, the paper's
(JᵀWJ)⁻¹ vs numpyro's Laplace, the χ²-distribution curvature, and flags for degenerate models.

The calibration set (built once, shared with test_bootstrap.py and test_nuts.py): one known
Sérsic truth drawn by GalSim (pixel-integrated) and convolved with a sampled Moffat PSF,
``N_REAL`` Gaussian noise realisations with the stated σ, all MAP-fitted in one batch.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import pytest

import galbayes as gb
from galbayes.inference import fit_map, invert_curvature, laplace_errors, loglike_curvature

galsim = pytest.importorskip("galsim")

SIZE, PSF_SIZE, PSF_FWHM = 40, 11, 2.5
N_REAL = 400
ZP = 22.5
SKY_SIGMA, GAIN = 0.02, 500.0
# The fanless oversampling keeps compile times low; for this truth it reproduces GalSim to
# 0.05σ in the worst pixel (Σ Δ²/σ² = 0.02), far below the statistical errors. Without the
# exact central quadrature the cusp of a Sérsic profile makes tiny local χ² minima where the
# centre sits on a sub-pixel sample; ~0.5% of the realisations stop there, where the
# Hessian is not positive definite, and are flagged (that is what the flags are for).
OVERSAMPLE = ((11, 5),)
TRUTH = {"sersic_xc": 19.3, "sersic_yc": 20.2, "sersic_pa": 30.0, "sersic_q": 0.6,
         "sersic_re": 4.0, "sersic_n": 2.5, "sersic_mag": 19.0}
PARAMS = list(TRUTH)


class Calibration(NamedTuple):
    model: object
    batch: object
    res: object           # MapResult
    truth: np.ndarray     # (E,)
    noiseless: np.ndarray
    sigma: np.ndarray
    psf: np.ndarray
    data: np.ndarray      # (N_REAL, SIZE, SIZE)


def sersic_model(**kw):
    return gb.Model([gb.Component("sersic", "sersic", {"re": {"bounds": [0.3, 40.0]},
                                                       "n": {"bounds": [0.3, 8.0]}})],
                    likelihood="gaussian", oversample=kw.pop("oversample", OVERSAMPLE),
                    psf_type=kw.pop("psf_type", "optical"), **kw)   # galsim_mock's PSF is sampled


def galsim_mock():
    """Noiseless GalSim image (pixel-integrated Sérsic ⊛ sampled PSF), σ map and PSF."""
    from scipy.signal import fftconvolve

    from _helpers import galsim_draw
    from galbayes.mocks import moffat_psf

    t = TRUTH
    psf = moffat_psf(PSF_SIZE, fwhm=PSF_FWHM, psf_type="optical")   # sampled at pixel centres
    gal = galsim.Sersic(n=t["sersic_n"], half_light_radius=t["sersic_re"] * np.sqrt(t["sersic_q"]),
                        flux=10 ** (-0.4 * (t["sersic_mag"] - ZP)))
    gal = gal.shear(q=t["sersic_q"], beta=(t["sersic_pa"] + 90.0) * galsim.degrees)
    img = galsim_draw(gal, (SIZE, SIZE), t["sersic_xc"], t["sersic_yc"])
    # galbayes' model is PSF ⊛ (pixel-integrated profile) with zero padding, "same" alignment
    noiseless = fftconvolve(img, psf, mode="same")
    sigma = np.sqrt(SKY_SIGMA**2 + np.clip(noiseless, 0.0, None) / GAIN)
    return noiseless, sigma, psf


@functools.lru_cache(maxsize=None)
def calibration() -> Calibration:
    model = sersic_model()
    noiseless, sigma, psf = galsim_mock()
    rng = np.random.default_rng(20240611)
    data = noiseless[None] + rng.normal(size=(N_REAL, SIZE, SIZE)) * sigma[None]
    gals = [model.pack(gb.Observation(image=d, sigma=sigma, psf=psf, zp=ZP, id=f"r{i}"), TRUTH)
            for i, d in enumerate(data)]
    batch = gb.Model.stack(gals)
    # LM from the truth (the χ² minimum is what matters here); the same compiled program
    # (options and batch shape) serves the bootstrap replicas in test_bootstrap.py.
    res = fit_map(model, batch, max_iter=0)
    truth = np.array([TRUTH.get(k, 0.0) for k in model.keys])
    return Calibration(model, batch, res, truth, noiseless, sigma, psf, data)


@functools.lru_cache(maxsize=None)
def laplace(method: str):
    cal = calibration()
    return laplace_errors(cal.model, cal.batch, cal.res.values, method=method)


def deviations(model, values, truth):
    """values − truth, with position angles wrapped into [-90°, 90°)."""
    d = np.asarray(values, np.float64) - truth
    for i, e in enumerate(model.entries):
        if e.spec.angle:
            d[..., i] = (d[..., i] + 90.0) % 180.0 - 90.0
    return d


def coverage(model, values, errors, truth, use=None) -> dict:
    """Fraction of galaxies whose 1σ interval contains the truth, per parameter of PARAMS."""
    d = deviations(model, values, truth)
    inside = np.abs(d) <= errors
    use = np.ones(len(values), bool) if use is None else use
    return {k: float(inside[use, model.keys.index(k)].mean()) for k in PARAMS}


def format_coverage(rows: dict) -> str:
    head = "method".ljust(28) + "".join(k.replace("sersic_", "").rjust(7) for k in PARAMS)
    lines = [head]
    for name, cov in rows.items():
        lines.append(name.ljust(28) + "".join(f"{100 * cov[k]:6.1f}%" for k in PARAMS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- calibration
def test_calibration_fits_converged():
    cal = calibration()
    assert cal.res.converged.mean() > 0.98
    k = SIZE * SIZE - cal.model.n_free
    assert abs(np.median(cal.res.chi2) / k - 1.0) < 0.02   # σ is the true σ, model matches GalSim


def test_laplace_hessian_coverage_is_68_percent():
    cal = calibration()
    lb, la = laplace("hessian"), laplace("jacobian")
    ok = np.array([f == "ok" for f in lb.flags]) & cal.res.converged
    assert ok.mean() > 0.98, sorted(set(lb.flags))
    cov_b = coverage(cal.model, cal.res.values, lb.errors, cal.truth, ok)
    cov_a = coverage(cal.model, cal.res.values, la.errors, cal.truth, ok)
    print(f"\n68% interval coverage over {ok.sum()} noise realisations (GalSim truth):\n"
          + format_coverage({"(b) Laplace, Hessian": cov_b, "(a) (J^T W J)^-1": cov_a}))
    for k in PARAMS:
        assert 0.62 <= cov_b[k] <= 0.74, f"{k}: coverage {cov_b[k]:.3f}"
        assert 0.62 <= cov_a[k] <= 0.74, f"{k}: coverage {cov_a[k]:.3f} (jacobian)"


def test_laplace_errors_match_scatter_of_maps():
    """The error bar equals the scatter of the MAP over noise realisations (to ~10%)."""
    cal = calibration()
    lb = laplace("hessian")
    d = deviations(cal.model, cal.res.values, cal.truth)
    ok = np.array([f == "ok" for f in lb.flags])
    for k in PARAMS:
        i = cal.model.keys.index(k)
        ratio = np.std(d[ok, i]) / np.median(lb.errors[ok, i])
        assert 0.88 < ratio < 1.12, f"{k}: scatter/error = {ratio:.3f}"


def test_jacobian_and_hessian_agree_at_the_map():
    cal = calibration()
    la, lb = laplace("jacobian"), laplace("hessian")
    free = np.asarray(cal.model.free)
    ok = np.array([fa == fb == "ok" for fa, fb in zip(la.flags, lb.flags)])
    rel = la.errors[ok][:, free] / lb.errors[ok][:, free] - 1.0
    print(f"\n(a)/(b) - 1 at realisation 0: {np.round(rel[0], 4)}; "
          f"median |.| over all {np.median(np.abs(rel)):.4f}, 99th percentile "
          f"{np.percentile(np.abs(rel), 99):.4f}")
    assert np.all(np.abs(rel[0]) < 0.05)
    assert np.median(np.abs(rel)) < 0.02 and np.percentile(np.abs(rel), 90) < 0.05
    # whole covariance, not only the diagonal: correlation matrices agree too
    ca, cb = la.covariance[0], lb.covariance[0]
    corr = lambda c: c / np.sqrt(np.outer(np.diag(c), np.diag(c)))  # noqa: E731
    assert np.max(np.abs(corr(ca) - corr(cb))) < 0.05
    # fixed entries (box) get error 0; every free error is positive and finite
    assert np.all(la.errors[:, cal.model.keys.index("sersic_box")] == 0.0)
    assert np.all(np.isfinite(lb.errors[ok][:, free])) and np.all(lb.errors[ok][:, free] > 0)
    # the rare exceptions are flagged, never silent NaN
    assert ok.mean() > 0.98 and not np.any(np.isnan(lb.errors))


def test_errors_are_in_user_units_for_log_parameters():
    """re and n are sampled as log10; their errors are in px and dimensionless, not dex."""
    cal = calibration()
    lb = laplace("hessian")
    ok = np.array([f == "ok" for f in lb.flags])
    re_err = np.median(lb.errors[ok, cal.model.keys.index("sersic_re")])
    d = deviations(cal.model, cal.res.values, cal.truth)[ok, cal.model.keys.index("sersic_re")]
    assert 0.85 < np.std(d) / re_err < 1.15            # px scatter vs px error


# ----------------------------------------------------------------------------- χ² likelihood
def test_chi2_distribution_curvature_is_order_one_over_k():
    """At the MAP the χ²-distribution likelihood is (1 − (k−2)/χ²_min) × as curved as the
    Gaussian one: 2/k when χ²_min = k; on its own maximum (the shell χ² = k − 2) its
    Hessian is rank one. Measured by autodiff of the likelihood code."""
    cal = calibration()
    model = cal.model
    k = SIZE * SIZE - model.n_free
    import jax

    n = 32
    sub = jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], cal.batch)
    values, chi2 = cal.res.values[:n], cal.res.chi2[:n]
    # (1) χ²_min = k exactly: rescale σ (the MAP does not move)
    scaled = sub._replace(sigma=(sub.sigma * np.sqrt(chi2 / k)[:, None, None]).astype(np.float32))
    h = loglike_curvature(model, scaled, values)
    ratio = np.array([np.sum(hc * hg) / np.sum(hg * hg) for hc, hg in zip(h["chi2"], h["gaussian"])])
    resid = max(np.max(np.abs(hc - r * hg)) / (r * np.max(np.abs(hg)))
                for hc, hg, r in zip(h["chi2"], h["gaussian"], ratio))
    print(f"\nchi2-distribution / Gaussian curvature at the MAP with chi2_min = k = {k}: "
          f"median {np.median(ratio):.3e} (2/k = {2 / k:.3e}), max off-proportionality {resid:.1e}")
    assert np.all(np.abs(ratio * k / 2 - 1.0) < 0.05)
    assert resid < 0.02
    # (2) the real data: ratio = 1 − (k−2)/χ²_min per realisation, of either sign, |.| ~ √(2/k)
    h = loglike_curvature(model, sub, values)
    ratio = np.array([np.sum(hc * hg) / np.sum(hg * hg) for hc, hg in zip(h["chi2"], h["gaussian"])])
    expect = 1.0 - (k - 2.0) / chi2
    print(f"on {n} noise realisations: ratio median {np.median(ratio):+.2e}, median |ratio| "
          f"{np.median(np.abs(ratio)):.2e} (sqrt(2/k) = {np.sqrt(2 / k):.2e}), "
          f"{np.mean(ratio < 0):.0%} not even a maximum")
    np.testing.assert_allclose(ratio, expect, atol=1e-4)
    assert np.median(np.abs(ratio)) < 3 * np.sqrt(2.0 / k)
    # (3) on the shell χ² = k − 2 (σ rescaled so that χ²_min = k − 2 − Δ): rank one
    delta = 10.0
    g0 = jax.tree_util.tree_map(lambda a: np.repeat(np.asarray(a)[:1], n, axis=0), sub)  # one shape
    g0 = g0._replace(sigma=(g0.sigma * np.sqrt(chi2[0] / (k - 2 - delta))).astype(np.float32))
    hg = loglike_curvature(model, g0, np.repeat(values[:1], n, axis=0))["gaussian"][0]
    free = np.asarray(model.free)
    lam, vec = np.linalg.eigh(hg)
    direction = vec[:, -1] / np.sqrt(lam[-1])          # unit step in the Gaussian metric
    chi2_of = _chi2_along(model, g0, values[0], free, direction)
    lo_t, hi_t = 0.0, 2.0 * np.sqrt(delta)             # χ² ≈ χ²_min + t²
    for _ in range(40):                                 # bisection for χ² = k − 2
        mid = 0.5 * (lo_t + hi_t)
        lo_t, hi_t = (mid, hi_t) if chi2_of(mid) < k - 2 else (lo_t, mid)
    on_shell = np.repeat(values[:1], n, axis=0)
    on_shell[:, free] += lo_t * direction
    h = loglike_curvature(model, g0, on_shell)
    w = np.linalg.inv(np.linalg.cholesky(hg))          # whiten with the Gaussian curvature
    ev = np.linalg.eigvalsh(w @ h["chi2"][0] @ w.T)
    print(f"on the shell chi2 = k - 2 (Delta chi2 = {delta}): whitened eigenvalues "
          f"{np.array2string(ev, precision=2)}; expected one = 2 Delta/(k-2) = {2 * delta / (k - 2):.3f}, rest 0")
    assert abs(ev[-1] / (2 * delta / (k - 2)) - 1.0) < 0.25
    assert np.all(np.abs(ev[:-1]) < 0.1 * ev[-1])


def _chi2_along(model, gal1, values, free, direction):
    import jax
    import jax.numpy as jnp

    g = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), gal1)
    fn = jax.jit(lambda v: model.chi2(v, g))

    def chi2_of(t):
        v = np.array(values, np.float64)
        v[free] += t * direction
        return float(fn(jnp.asarray(v, jnp.float32)))
    return chi2_of


# ----------------------------------------------------------------------------- flags
def test_invert_curvature_flags_synthetic_matrices():
    keys = ["a", "b", "c"]
    a = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
    err, cov, flag = invert_curvature(a, keys=keys)
    assert flag == "ok"
    np.testing.assert_allclose(cov, np.linalg.inv(a), rtol=1e-10)
    sing = a.copy()
    sing[2, :] = sing[:, 2] = 0.0                       # "c" has no effect
    err, cov, flag = invert_curvature(sing, keys=keys)
    assert flag.startswith("covariance singular") and "c" in flag
    assert np.isinf(err[2]) and np.all(np.isfinite(err[:2]))
    np.testing.assert_allclose(cov[:2, :2], np.linalg.inv(a[:2, :2]), rtol=1e-10)
    nonpd = a.copy()
    nonpd[0, 1] = nonpd[1, 0] = 5.0                     # indefinite
    err, cov, flag = invert_curvature(nonpd, keys=keys)
    assert flag.startswith("covariance not positive definite")
    assert not np.any(np.isnan(err))
    _, _, flag = invert_curvature(np.full((3, 3), np.nan), keys=keys)
    assert flag == "covariance not finite"
    _, _, flag = invert_curvature(a, keys=keys, free_values=[1.0, 2.0, 10.0], lo=[0, 0, 0],
                                  hi=[10, 10, 10], log=[False, False, False])
    assert "at prior bound: c" in flag


def _obs(image=None):
    cal = calibration()
    return gb.Observation(image=cal.data[0] if image is None else image, sigma=cal.sigma,
                          psf=cal.psf, zp=ZP)


def test_pa_of_a_round_galaxy_is_flagged_not_nan():
    """q fixed at 1: pa has no effect on the image. Both methods flag it; no error is NaN."""
    model = gb.Model([gb.Component("sersic", "sersic", {"q": {"init": 1.0, "fixed": True},
                                                        "n": {"bounds": [0.3, 8.0]}})],
                     oversample=())
    init = {k: v for k, v in TRUTH.items() if k != "sersic_q"}
    # noiseless data of the model itself: the MAP is the truth, the Hessian the Fisher matrix
    image = gb.render_model(model, _obs(), init)
    gal = model.pack(_obs(image), init)
    batch = gb.Model.stack([gal])
    values = np.asarray(gal.values0, np.float64)[None]
    for method in ("jacobian", "hessian"):
        res = laplace_errors(model, batch, values, method=method)
        flag = res.flags[0]
        print(f"\n{method}: {flag}")
        assert flag != "ok" and "sersic_pa" in flag
        assert not np.any(np.isnan(res.errors))
        others = [model.keys.index(k) for k in ("sersic_xc", "sersic_re", "sersic_mag")]
        assert np.all(np.isfinite(res.errors[0, others])) and np.all(res.errors[0, others] > 0)


def test_two_identical_components_are_flagged_singular():
    comps = [gb.Component(name, "sersic", {"n": {"bounds": [0.3, 8.0]}}) for name in ("a", "b")]
    model = gb.Model(comps, oversample=())
    init = {}
    for name in ("a", "b"):
        init.update({k.replace("sersic", name): v for k, v in TRUTH.items()})
        init[f"{name}_mag"] = TRUTH["sersic_mag"] + 0.75
    gal = model.pack(_obs(), init)
    res = laplace_errors(model, gb.Model.stack([gal]), np.asarray(gal.values0, np.float64)[None],
                         method="jacobian")
    flag = res.flags[0]
    print("\n" + flag)
    assert flag.startswith("covariance singular") or flag.startswith("covariance not positive definite")
    assert not np.any(np.isnan(res.errors))
    assert np.any(np.isinf(res.errors))


# ----------------------------------------------------------------------------- Hessian assembly
def _potential_hessian_reference(model, batch, values):
    """``jax.hessian`` of numpyro's potential energy (Gaussian likelihood) in unconstrained
    coordinates: the definition that laplace.py assembles from its parts."""
    import jax
    import jax.numpy as jnp
    from numpyro.infer.util import potential_energy

    from galbayes.inference.laplace import _unconstrained

    def one(v, gal):
        flat, unravel = _unconstrained(model, v, gal)
        return jax.hessian(lambda x: potential_energy(model.numpyro_model, (gal,), {"likelihood": "gaussian"},
                                                      unravel(x)))(flat)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(values, jnp.float32), batch), np.float64)


@pytest.mark.parametrize("recipe, oversample", [
    ("sersic", None),                 # default pixel integration (sub-pixel box + central fan)
    ("sersic_sky", ()),               # an unconvolved component
    ("psf_host", ()),                 # a point source (Fourier-space term)
    ("bulge_disk_bar", ()),           # three convolved components sharing a centre
])
def test_hessian_equals_autodiff_of_numpyro_potential(recipe, oversample):
    """The Hessian of method "hessian" is assembled as JᵀJ − Σ u·∇²(unconvolved model) + prior
    Hessian; it must equal the plain autodiff Hessian of numpyro's potential energy. Checked
    away from the minimum (perturbed parameters), where the second-order residual term is
    large, and on models with unconvolved, point-source and several convolved components."""
    import jax
    import jax.numpy as jnp

    from galbayes.inference.laplace import _compiled, _to_free_values, _unconstrained, values_into_bounds
    from galbayes.mocks import sersic_mocks
    from galbayes.recipe import load_recipe

    model = load_recipe(recipe, likelihood="gaussian")
    if oversample is not None:
        model = gb.Model(model.components, likelihood="gaussian", oversample=oversample)
    mocks = sersic_mocks(3, size=48, psf_size=15, seed=11, re_range=(2.5, 8.0), q_range=(0.4, 0.9),
                         n_range=(1.0, 4.0), mag_range=(17.0, 18.0))
    first = model.components[0].name          # the mocks' truth as the first component's start
    batch = gb.Model.stack([model.pack(m.obs, {k.replace("sersic_", first + "_"): v for k, v in m.init.items()})
                            for m in mocks])
    rng = np.random.default_rng(3)
    values = np.asarray(batch.values0, np.float64).copy()
    free = np.asarray(model.free)
    lo, hi = np.asarray(batch.lo, np.float64), np.asarray(batch.hi, np.float64)
    # move every free parameter by up to 2% of its range (stays well inside the bounds)
    values[:, free] = np.clip(values[:, free] + rng.uniform(-0.02, 0.02, lo.shape) * (hi - lo),
                              lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo))
    values = values_into_bounds(model, batch, values)
    ref = _potential_hessian_reference(model, batch, values)
    hess, _ = _compiled(model, "hessian")(jnp.asarray(values, jnp.float32), jax.tree_util.tree_map(jnp.asarray, batch))
    hess = np.asarray(hess, np.float64)
    scale = np.sqrt(np.abs(np.einsum("bii->bi", ref)))
    norm = lambda h: h / (scale[:, :, None] * scale[:, None, :])  # noqa: E731
    err = np.max(np.abs(norm(hess) - norm(ref)))

    # the residual term is not negligible at these points: Gauss-Newton alone is far off
    def gauss_newton(v, gal):
        flat, unravel = _unconstrained(model, v, gal)
        to_values = _to_free_values(model, gal, unravel, free_only=False)
        jac = jax.jacfwd(lambda x: model.residuals(to_values(x), gal))(flat)
        return jac.T @ jac
    gn = np.asarray(jax.jit(jax.vmap(gauss_newton))(jnp.asarray(values, jnp.float32),
                                                   jax.tree_util.tree_map(jnp.asarray, batch)), np.float64)
    gn_err = np.max(np.abs(norm(gn) - norm(ref)))
    print(f"\n{recipe}: max |assembled - autodiff| = {err:.1e}, Gauss-Newton alone {gn_err:.1e} "
          "(unit-diagonal scale)")
    assert gn_err > 1e-2
    # float32: the second-order term is up to ~100x the Hessian in this scale, and the default
    # pixel integration (band-limited core) sums many more terms, so its agreement is at the
    # 1e-3 level (measured 2.8-3.1e-3); a missing or wrong term shows as O(1) (Gauss-Newton: >1e-2).
    assert err < (5e-3 if oversample is None else 1e-3)


def test_reusing_the_fits_gauss_newton_matrix_gives_the_same_errors():
    """laplace_errors(model, batch, fit) reuses the LM's last JᵀJ (computed at the point it
    returns); the errors must be those of a fresh computation from the values, also for a
    fit that ends on a bound (n pushed to its upper bound) and for values changed after the
    fit (which must not reuse the fit's matrix)."""
    cal = calibration()
    import jax
    sub = jax.tree_util.tree_map(lambda a: np.asarray(a)[:24], cal.batch)
    # the first 4 realisations with an upper bound on n below the truth: the fit ends there
    lo, hi = np.array(sub.lo), np.array(sub.hi)
    jn = cal.model.free.index(cal.model.keys.index("sersic_n"))
    hi[:4, jn] = 2.2
    v0 = np.array(sub.values0)
    v0[:4, cal.model.keys.index("sersic_n")] = 2.0
    sub = sub._replace(lo=lo, hi=hi, values0=v0)
    fit = fit_map(cal.model, sub, max_iter=0)
    assert np.allclose(fit.values[:4, cal.model.keys.index("sersic_n")], 2.2, rtol=2e-3)
    assert fit.gauss_newton.shape == (24, cal.model.n_free, cal.model.n_free)
    fresh = laplace_errors(cal.model, sub, fit.values)
    reused = laplace_errors(cal.model, sub, fit)
    free = np.asarray(cal.model.free)
    rel = np.abs(reused.errors[:, free] / fresh.errors[:, free] - 1.0)
    print(f"\nreused / fresh - 1: max {rel.max():.1e}; flags of the bound fits: {reused.flags[:1]}")
    assert reused.flags == fresh.flags
    assert all("at prior bound: sersic_n" in f for f in reused.flags[:4])
    assert rel.max() < 1e-3
    # values moved after the fit: the fit's JᵀJ is not used for them
    moved = fit.values.copy()
    moved[5, cal.model.keys.index("sersic_re")] *= 1.3
    changed = fit._replace(values=moved)
    a = laplace_errors(cal.model, sub, changed).errors[5, free]
    b = laplace_errors(cal.model, sub, moved).errors[5, free]
    assert np.allclose(a, b, rtol=1e-3)
    assert not np.allclose(a, fresh.errors[5, free], rtol=1e-2)


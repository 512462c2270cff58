"""Bootstrap error bars (galbayes.inference.bootstrap): resampling weights, coverage on the
GalSim calibration mocks of test_laplace.py (fewer realisations: every one costs n_boot LM
refits), agreement with Laplace."""
from __future__ import annotations

import numpy as np
import pytest

from galbayes.inference import bootstrap_errors
from galbayes.inference.bootstrap import bootstrap_weights

pytest.importorskip("galsim")
import test_laplace as cal_mod  # noqa: E402  (the shared calibration set)

N_BOOT_REAL = 8      # realisations bootstrapped (×N_BOOT refits each: one batch of 400)
N_BOOT = 50


def test_bootstrap_weights_are_multinomial_pixel_counts():
    weight = np.ones((12, 10), np.float32)
    weight[:3, :4] = 0.0                                 # masked corner
    rng = np.random.default_rng(1)
    w = bootstrap_weights(weight, 200, rng)
    n_use = int(weight.sum())
    assert w.shape == (200, 12, 10)
    assert np.all(w[:, :3, :4] == 0)                     # masked pixels never drawn
    np.testing.assert_array_equal(w.sum(axis=(1, 2)), n_use)   # N draws with replacement
    assert np.all(w == np.round(w))
    # each pixel's multiplicity is Binomial(N, 1/N): mean 1, variance (1 - 1/N)
    counts = w[:, weight > 0]
    assert abs(counts.mean() - 1.0) < 1e-6
    assert abs(counts.var() - (1 - 1 / n_use)) < 0.05
    # about e^-1 of the pixels are left out of a replica
    assert abs(np.mean(counts == 0) - np.exp(-1)) < 0.02


def _bootstrap():
    cal = cal_mod.calibration()
    import jax

    sub = jax.tree_util.tree_map(lambda a: np.asarray(a)[:N_BOOT_REAL], cal.batch)
    # batch_size = the calibration batch: reuses the compiled LM program of its MAP fits
    res = bootstrap_errors(cal.model, sub, cal.res.values[:N_BOOT_REAL], n_boot=N_BOOT, seed=3,
                           batch_size=cal_mod.N_REAL)
    return cal, res


def test_bootstrap_coverage_and_agreement_with_laplace():
    cal, boot = _bootstrap()
    model = cal.model
    free = np.asarray(model.free)
    assert all(f == "ok" for f in boot.flags), boot.flags
    assert np.all(boot.n_good == N_BOOT)
    # the centre is refitted, not held fixed
    for k in ("sersic_xc", "sersic_yc"):
        i = model.keys.index(k)
        assert np.all(boot.errors[:, i] > 0) and np.all(np.std(boot.samples[:, :, i], axis=1) > 0)
    assert np.all(boot.errors[:, model.keys.index("sersic_box")] == 0.0)
    # σ² = mean squared deviation of the refits (paper §5.2), covariance consistent
    np.testing.assert_allclose(np.sqrt(np.diagonal(boot.covariance, axis1=1, axis2=2)),
                               boot.errors[:, free], rtol=1e-10)
    x = boot.samples[0][:, free]
    np.testing.assert_allclose(boot.errors[0, free], np.sqrt(np.mean((x - x.mean(0)) ** 2, axis=0)))

    lap = cal_mod.laplace("hessian")
    jac = cal_mod.laplace("jacobian")
    n = N_BOOT_REAL
    ok = np.array([f == "ok" for f in lap.flags[:n]])
    cov_boot = cal_mod.coverage(model, cal.res.values[:n], boot.errors, cal.truth, ok)
    cov_b = cal_mod.coverage(model, cal.res.values[:n], lap.errors[:n], cal.truth, ok)
    cov_a = cal_mod.coverage(model, cal.res.values[:n], jac.errors[:n], cal.truth, ok)
    ratio = np.median(boot.errors[ok][:, free] / lap.errors[:n][ok][:, free], axis=0)
    pooled = np.mean([cov_boot[k] for k in cal_mod.PARAMS])
    print(f"\n68% coverage on the first {ok.sum()} realisations (bootstrap: {N_BOOT} replicas each):\n"
          + cal_mod.format_coverage({"bootstrap": cov_boot, "(b) Laplace, Hessian (same)": cov_b,
                                     "(a) (J^T W J)^-1 (same)": cov_a})
          + f"\npooled bootstrap coverage {pooled:.1%}; median bootstrap/Laplace error ratio per "
          f"parameter {np.round(ratio, 2)}")
    # A smoke figure (8 realisations × 7 parameters, correlated): the coverage on 100
    # realisations with 100 replicas each is measured by benchmarks/bench_errors.py.
    assert 0.45 <= pooled <= 0.9
    assert np.all((ratio > 0.75) & (ratio < 1.4))


def test_bootstrap_is_deterministic_per_seed():
    weight = np.ones((8, 8), np.float32)
    a = bootstrap_weights(weight, 3, np.random.default_rng([5, 0]))
    b = bootstrap_weights(weight, 3, np.random.default_rng([5, 0]))
    c = bootstrap_weights(weight, 3, np.random.default_rng([5, 1]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)

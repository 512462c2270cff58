"""NUTS refinement (galbayes.inference.nuts) on the GalSim calibration mocks of
test_laplace.py: convergence diagnostics, agreement with Laplace, coverage on a few
realisations (NUTS is the slow method: K_REAL realisations × CHAINS chains here; the
benchmark script measures it on more), posterior files; optional end-to-end CLI run."""
from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

from galbayes.inference import run_nuts, save_posteriors, summary_rows

pytest.importorskip("galsim")
import test_laplace as cal_mod  # noqa: E402  (the shared calibration set)

K_REAL, CHAINS, WARMUP, DRAWS = 4, 4, 200, 400


@functools.lru_cache(maxsize=None)
def nuts_run():
    cal = cal_mod.calibration()
    import jax

    sub = jax.tree_util.tree_map(lambda a: np.asarray(a)[:K_REAL], cal.batch)
    res = run_nuts(cal.model, sub, cal.res.values[:K_REAL], chains=CHAINS, warmup=WARMUP,
                   draws=DRAWS, seed=11)
    return cal, res


K_WELL, DRAWS_WELL = 3, 1000


@functools.lru_cache(maxsize=None)
def well_posed_run():
    """The calibration truth with the package's default pixel integration (central
    triangle-fan quadrature): a smooth target. The fanless model of the calibration fixture
    has tiny kinks where the centre crosses a sub-pixel sample, and NUTS reports them as
    occasional divergences (measured: 12 in 16 × 1600 draws, none with the default model)."""
    import jax

    import galbayes as gb
    from galbayes.inference import fit_map, laplace_errors

    cal = cal_mod.calibration()
    model = cal_mod.sersic_model(oversample=gb.model.DEFAULT_OVERSAMPLE)
    batch = gb.Model.stack([model.pack(gb.Observation(image=d, sigma=cal.sigma, psf=cal.psf, zp=cal_mod.ZP),
                                       cal_mod.TRUTH) for d in cal.data[:K_WELL]])
    values = fit_map(model, batch, max_iter=0).values
    lap = laplace_errors(model, batch, values, method="hessian")
    res = run_nuts(model, batch, values, chains=CHAINS, warmup=WARMUP, draws=DRAWS_WELL, seed=5)
    return model, values, lap, jax.tree_util.tree_map(np.asarray, batch), res


def test_nuts_converges_on_a_well_posed_mock():
    model, _, _, _, res = well_posed_run()
    print(f"\nNUTS: {K_WELL} galaxies x {CHAINS} chains x ({WARMUP} + {DRAWS_WELL}) in {res.wall_time:.1f} s "
          f"(+{res.compile_time:.1f} s compile); max R-hat {np.nanmax(res.r_hat):.4f}, "
          f"min bulk ESS {np.nanmin(res.ess_bulk):.0f}, divergences {res.divergences.tolist()}, "
          f"mean leapfrog steps {np.round(res.mean_tree_steps, 1).tolist()}")
    assert res.samples.shape == (K_WELL, CHAINS, DRAWS_WELL, len(model.keys))
    assert np.all(res.r_hat < 1.01), res.r_hat
    assert np.all(res.divergences == 0), res.divergences
    assert np.all(res.ess_bulk > 400)
    # fixed entries stay at their value
    box = model.keys.index("sersic_box")
    assert np.all(res.samples[..., box] == 0.0)


def test_nuts_posterior_matches_laplace():
    model, values, lap, _, res = well_posed_run()
    free = np.asarray(model.free)
    mean = res.samples.mean(axis=(1, 2))
    sd = res.samples.std(axis=(1, 2))
    assert all(f == "ok" for f in lap.flags)
    z = cal_mod.deviations(model, mean, values)[:, free] / lap.errors[:, free]
    ratio = sd[:, free] / lap.errors[:, free]
    print(f"\n(posterior mean - MAP) / Laplace sigma: max |.| {np.abs(z).max():.2f}; "
          f"posterior sd / Laplace sigma: median {np.median(ratio):.3f}, range "
          f"[{ratio.min():.2f}, {ratio.max():.2f}]")
    assert np.all(np.abs(z) < 1.0)
    assert np.all((ratio > 0.8) & (ratio < 1.25))


def test_nuts_coverage_few_realisations():
    cal, res = nuts_run()
    lap = cal_mod.laplace("hessian")
    lo, hi = np.percentile(res.samples, [15.87, 84.13], axis=(1, 2))
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    cov_nuts = cal_mod.coverage(cal.model, centre, half, cal.truth)
    cov_b = cal_mod.coverage(cal.model, cal.res.values[:K_REAL], lap.errors[:K_REAL], cal.truth)
    pooled = np.mean([cov_nuts[k] for k in cal_mod.PARAMS])
    print(f"\n68% coverage on only {K_REAL} realisations (NUTS central 68% interval):\n"
          + cal_mod.format_coverage({"NUTS": cov_nuts, "(b) Laplace (same)": cov_b})
          + f"\npooled NUTS coverage {pooled:.1%}")
    assert 0.4 <= pooled <= 0.95      # a smoke figure at this sample size


def test_posterior_files_and_summary(tmp_path):
    import arviz as az

    cal, res = nuts_run()
    ids = [f"r{i}" for i in range(K_REAL)]
    paths = save_posteriors(cal.model, res, ids[:2], tmp_path / "posteriors",
                            map_values=cal.res.values[:2])
    idata = az.from_netcdf(str(paths[1]))
    assert set(idata.posterior.data_vars) == set(cal.model.free_keys)
    x = idata.posterior["sersic_re"].values
    assert x.shape == (CHAINS, DRAWS)
    np.testing.assert_allclose(x, res.samples[1, :, :, cal.model.keys.index("sersic_re")], rtol=1e-6)
    assert 3.0 < x.mean() < 5.0                        # user units (px), not log10
    assert int(idata.sample_stats["diverging"].values.sum()) == res.divergences[1]
    assert idata.posterior.attrs["likelihood"] == "gaussian"
    assert idata.posterior.attrs["galaxy_id"] == "r1"
    rows = summary_rows(res, ids)
    assert len(rows) == K_REAL * cal.model.n_free
    assert {"id", "param", "mean", "sd", "r_hat", "ess_bulk", "divergences"} <= set(rows[0])


def test_subset_selection_by_rows_and_where():
    from astropy.table import Table

    from galbayes.errors import InputError
    from galbayes.sampling import _row_indices, _where_mask

    t = Table({"id": ["a", "b", "c", "d"], "chi2_red": [1.0, 2.5, np.nan, 1.2],
               "status": ["ok", "ok", "fit failed: x", "ok"]})
    assert _row_indices([False, True, False, True], 4).tolist() == [1, 3]
    assert _row_indices([2, 0], 4).tolist() == [2, 0]
    assert _where_mask(t, "chi2_red > 1.1").tolist() == [False, True, False, True]   # NaN never selected
    assert _where_mask(t, "chi2_red<=1").tolist() == [True, False, False, False]
    assert _where_mask(t, "status == ok").tolist() == [True, True, False, True]
    for bad in ([True, False], [7], [0.5]):
        with pytest.raises(InputError, match="rows"):
            _row_indices(bad, 4)
    for bad, msg in (("sersic_n > 4", "no column 'sersic_n'"), ("chi2_red >> 1", "cannot read"),
                     ("chi2_red > big", "not a number")):
        with pytest.raises(InputError, match=msg):
            _where_mask(t, bad)


def test_unknown_likelihood_is_rejected():
    cal = cal_mod.calibration()
    with pytest.raises(ValueError):
        run_nuts(cal.model, cal.batch, cal.res.values, likelihood="poisson")


def test_cli_fit_with_errors_then_sample(tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    cal = cal_mod.calibration()
    rows = []
    for i in range(2):
        for name, arr in (("image", cal.data[i]), ("sigma", cal.sigma), ("psf", cal.psf)):
            fits.writeto(tmp_path / f"g{i}_{name}.fits", np.asarray(arr, np.float32), overwrite=True)
        rows.append({"id": f"g{i}", "image": f"g{i}_image.fits", "sigma": f"g{i}_sigma.fits",
                     "psf": f"g{i}_psf.fits"})
    Table(rows=rows).write(tmp_path / "cat.csv", format="ascii.csv")
    out = tmp_path / "out"
    run = [sys.executable, "-m", "galbayes"]
    r = subprocess.run(run + ["fit", str(tmp_path / "cat.csv"), "--model", "sersic", "--out", str(out),
                              "--errors", "laplace", "--quiet", "--batch-size", "2", "--psf-type", "optical"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    from galbayes.sampling import fit_model
    info = json.loads((out / "run.json").read_text())
    assert info["psf_type"] == "optical" and fit_model(info).psf_type == "optical"   # sample's model = the fit's
    table = Table.read(out / "results.fits")
    assert np.all(np.isfinite(table["sersic_re_err"])) and np.all(table["sersic_re_err"] > 0)
    assert (out / "covariance" / "g0.fits").exists() and (out / "run.json").exists()
    # chosen by row number (the same program as --ids; selections are tested below)
    r = subprocess.run(run + ["sample", str(out), "--rows", "1", "--chains", "2", "--draws", "200",
                              "--warmup", "150"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "posteriors" / "g1.nc").exists()
    summary = Table.read(out / "posterior_summary.csv", format="ascii.csv")
    assert set(summary["id"].astype(str)) == {"g1"} and "r_hat" in summary.colnames

"""Model choice (galbayes.compare, `galbayes compare`): BIC prefers the bulge + disk recipe on
GalSim Sérsic + exponential mocks and the single Sérsic on single-Sérsic mocks; failed fits
are excluded with a note; runs of different catalogs are refused; PSIS-LOO from posteriors
with pointwise log-likelihoods; the CLI end to end."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from galbayes.compare import compare_runs
from galbayes.errors import InputError

SIZE, PSF_SIZE, N_EACH = 48, 15, 10


def _two_component(count, seed):
    """GalSim Sérsic (n = 4) bulge + exponential disk, each with its own q and pa, ⊛ Moffat,
    pixel-integrated, with sky + source noise (as galbayes.mocks draws single Sérsics)."""
    import galsim

    from galbayes.mocks import moffat_psf

    rng = np.random.default_rng(seed)
    psf = moffat_psf(PSF_SIZE, fwhm=3.0)
    out = []
    for _ in range(count):
        xc, yc = (SIZE - 1) / 2.0 + rng.uniform(-1, 1, 2)
        bt, mag = rng.uniform(0.3, 0.6), rng.uniform(16.0, 17.0)
        flux = 10 ** (-0.4 * (mag - 22.5))
        bulge = galsim.Sersic(n=4.0, half_light_radius=rng.uniform(1.5, 3.0), flux=bt * flux)
        bulge = bulge.shear(q=rng.uniform(0.7, 1.0), beta=rng.uniform(0, 180) * galsim.degrees)
        disk = galsim.Exponential(scale_radius=rng.uniform(4.0, 7.0), flux=(1 - bt) * flux)
        disk = disk.shear(q=rng.uniform(0.3, 0.7), beta=rng.uniform(0, 180) * galsim.degrees)
        obj = galsim.Convolve(bulge + disk, galsim.Moffat(beta=3.5, fwhm=3.0))
        img = obj.drawImage(nx=SIZE, ny=SIZE, scale=1.0,
                            offset=(xc - (SIZE - 1) / 2.0, yc - (SIZE - 1) / 2.0)).array.astype(np.float64)
        sigma = np.sqrt(0.01**2 + np.clip(img, 0, None) / 500.0)
        out.append((img + rng.normal(size=img.shape) * sigma, sigma, psf))
    return out


def _one_component(count, seed):
    from galbayes.mocks import sersic_mocks

    return [(m.obs.image, m.obs.sigma, m.obs.psf)
            for m in sersic_mocks(count, size=SIZE, psf_size=PSF_SIZE, seed=seed, re_range=(2.0, 8.0),
                                  mag_range=(16.0, 17.0))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One catalog (10 two-component + 10 one-component mocks, no initial values) fitted with
    the recipes sersic and bulge_disk (default MAP budget: both converge)."""
    pytest.importorskip("galsim")
    from galbayes.pipeline import fit_catalog
    from galbayes.recipe import load_recipe

    d = tmp_path_factory.mktemp("compare")
    gals = [(f"bd{i}", g) for i, g in enumerate(_two_component(N_EACH, 1))]
    gals += [(f"s{i}", g) for i, g in enumerate(_one_component(N_EACH, 2))]
    lines = ["id,image,sigma,psf"]
    for gid, arrays in gals:
        for role, a in zip(("img", "sig", "psf"), arrays):
            fits.PrimaryHDU(np.asarray(a, np.float32)).writeto(d / f"{gid}_{role}.fits")
        lines.append(f"{gid},{gid}_img.fits,{gid}_sig.fits,{gid}_psf.fits")
    (d / "catalog.csv").write_text("\n".join(lines) + "\n")
    out = {}
    for recipe in ("sersic", "bulge_disk"):
        fit_catalog(d / "catalog.csv", load_recipe(recipe), d / recipe, progress=False, blocks=False)
        out[recipe] = d / recipe
    return out


def test_bic_prefers_the_true_number_of_components(runs, tmp_path):
    table = compare_runs([runs["sersic"], runs["bulge_disk"]], out=tmp_path / "compare.fits")
    ids = [str(i) for i in table["id"]]
    assert ids == [f"bd{i}" for i in range(N_EACH)] + [f"s{i}" for i in range(N_EACH)]
    two = np.array([i.startswith("bd") for i in ids])
    pref = np.array([str(p) for p in table["preferred"]])
    rate_two = np.mean(pref[two] == "bulge_disk")
    rate_one = np.mean(pref[~two] == "sersic")
    print(f"bulge_disk preferred on {rate_two:.0%} of two-component mocks, sersic on {rate_one:.0%} "
          f"of one-component mocks; delta_bic two {np.round(table['delta_bic'][two], 1)}, "
          f"one {np.round(table['delta_bic'][~two], 1)}")
    assert rate_two >= 0.9 and rate_one >= 0.9
    # the criteria from the results tables
    for lab, k in (("sersic", 7), ("bulge_disk", 11)):
        res = Table.read(runs[lab] / "results.fits")
        assert np.all(table[f"k_{lab}"] == k)
        np.testing.assert_allclose(table[f"chi2_{lab}"], res["chi2"])
        np.testing.assert_allclose(table[f"bic_{lab}"], res["chi2"] + k * np.log(SIZE * SIZE))
        np.testing.assert_allclose(table[f"aic_{lab}"], res["chi2"] + 2 * k)
        np.testing.assert_allclose(res["chi2"] / (SIZE * SIZE - k), res["chi2_red"], rtol=1e-12)
    assert np.all(table["n_pix"] == SIZE * SIZE)
    bic = np.stack([table["bic_sersic"], table["bic_bulge_disk"]])
    np.testing.assert_allclose(table["delta_bic"], np.abs(bic[0] - bic[1]))
    assert np.all(np.isnan(table["elpd_loo_sersic"])) and all(str(p) == "" for p in table["preferred_loo"])
    assert all(str(n) == "" for n in table["note"]) and np.all(table["n_models"] == 2)
    disk = Table.read(tmp_path / "compare.fits")
    assert [str(p) for p in disk["preferred"]] == list(pref)
    assert json.loads(disk.meta["RUNS"]) == {"sersic": str(runs["sersic"]), "bulge_disk": str(runs["bulge_disk"])}


def _copy_run(src, dst, edit):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("shards", "blocks", "*.lock"))
    t = Table.read(src / "results.fits")
    t = edit(t)
    t.write(dst / "results.fits", overwrite=True)
    return dst


def test_failed_fits_are_excluded_with_a_note(runs, tmp_path):
    def fail_bd0(t):
        t["status"] = t["status"].astype("U64")
        t["status"][0] = "fit failed: non-finite parameters or chi2"
        t["chi2"][0] = np.nan
        return t

    bad = _copy_run(runs["bulge_disk"], tmp_path / "bulge_disk", fail_bd0)
    table = compare_runs([runs["sersic"], bad])
    row = table[0]
    assert str(row["id"]) == "bd0"
    assert str(row["preferred"]) == "sersic" and row["n_models"] == 1 and math.isnan(row["delta_bic"])
    assert math.isnan(row["bic_bulge_disk"]) and "bulge_disk excluded (status: fit failed" in str(row["note"])
    assert str(table[1]["preferred"]) == "bulge_disk" and str(table[1]["note"]) == ""
    # "ok; ..." statuses are fits
    def flagged(t):
        t["status"] = t["status"].astype("U64")
        t["status"][1] = "ok; errors: singular"
        return t

    ok2 = _copy_run(runs["bulge_disk"], tmp_path / "flagged", flagged)
    assert str(compare_runs([runs["sersic"], ok2])[1]["preferred"]) == "bulge_disk"


def test_runs_of_different_catalogs_are_refused(runs, tmp_path):
    other = _copy_run(runs["bulge_disk"], tmp_path / "other", lambda t: t[:-1])
    with pytest.raises(InputError, match="different catalogs") as exc:
        compare_runs([runs["sersic"], other])
    assert "s9" in str(exc.value)
    renamed = tmp_path / "renamed"

    def rename(t):
        t["id"] = t["id"].astype("U16")
        t["id"][0] = "elsewhere"
        return t

    _copy_run(runs["bulge_disk"], renamed, rename)
    with pytest.raises(InputError, match="elsewhere"):
        compare_runs([runs["sersic"], renamed])
    with pytest.raises(InputError, match="at least two"):
        compare_runs([runs["sersic"]])
    with pytest.raises(InputError, match="results.fits not found"):
        compare_runs([runs["sersic"], tmp_path / "nothing"])


def test_loo_from_pointwise_log_likelihoods(runs, tmp_path):
    """PSIS-LOO where posteriors/<id>.nc holds a log_likelihood group: elpd as arviz computes
    it, and the recipe with the larger elpd preferred; a posterior without the group is noted."""
    import arviz as az

    rng = np.random.default_rng(3)
    n_pix, chains, draws = 200, 2, 100
    a = _copy_run(runs["sersic"], tmp_path / "sersic", lambda t: t)
    b = _copy_run(runs["bulge_disk"], tmp_path / "bulge_disk", lambda t: t)
    expected = {}
    for folder, shift in ((a, -2.0), (b, 0.0)):
        (folder / "posteriors").mkdir()
        resid = rng.normal(size=n_pix) + shift * (np.arange(n_pix) % 2)
        ll = -0.5 * (resid[None, None, :] + 0.05 * rng.normal(size=(chains, draws, n_pix))) ** 2
        idata = az.from_dict(posterior={"sersic_re": rng.normal(size=(chains, draws))},
                             log_likelihood={"pixels": ll})
        idata.to_netcdf(str(folder / "posteriors" / "s0.nc"))
        expected[folder.name] = float(az.loo(idata)["elpd_loo"])
        az.from_dict(posterior={"x": rng.normal(size=(chains, draws))}).to_netcdf(str(folder / "posteriors" / "s1.nc"))
    table = compare_runs([a, b])
    row = table[list(table["id"]).index("s0")]
    assert row["elpd_loo_sersic"] == pytest.approx(expected["sersic"])
    assert row["elpd_loo_bulge_disk"] == pytest.approx(expected["bulge_disk"])
    assert expected["bulge_disk"] > expected["sersic"] and str(row["preferred_loo"]) == "bulge_disk"
    assert row["elpd_loo_se_sersic"] > 0
    row1 = table[list(table["id"]).index("s1")]
    assert math.isnan(row1["elpd_loo_sersic"]) and str(row1["preferred_loo"]) == ""
    assert "no pointwise log-likelihood" in str(row1["note"])


def test_cli_compare(runs, tmp_path, capsys):
    from galbayes.cli import main

    out = tmp_path / "cmp.csv"
    rc = main(["compare", str(runs["sersic"]), str(runs["bulge_disk"]), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    t = Table.read(out, format="ascii.csv")
    assert len(t) == 2 * N_EACH and "preferred" in t.colnames and "delta_bic" in t.colnames
    assert str(out) in text and "bd0" in text
    assert "bulge_disk" in text and "sersic" in text
    other = _copy_run(runs["bulge_disk"], tmp_path / "other", lambda t: t[:3])
    rc = main(["compare", str(runs["sersic"]), str(other), "--out", str(tmp_path / "x.fits")])
    assert rc == 2 and "different catalogs" in capsys.readouterr().err
    assert not (tmp_path / "x.fits").exists()


def test_pointwise_log_likelihoods_of_nuts_draws_feed_loo(runs, tmp_path):
    """galbayes.inference.nuts.pointwise_loglike (what `galbayes sample --log-likelihood`
    stores): per unmasked pixel −½((D − M)/σ)² − ln σ√2π at each draw, summing to the Gaussian
    log-likelihood; written by to_inference_data as the log_likelihood group compare reads."""
    import arviz as az
    import jax.numpy as jnp

    from galbayes.data import Observation
    from galbayes.inference.nuts import NutsResult, pointwise_loglike, to_inference_data
    from galbayes.likelihood import chi2 as chi2_of, gaussian_loglike
    from galbayes.mocks import sersic_mocks
    from galbayes.recipe import load_recipe

    m = sersic_mocks(1, size=24, psf_size=9, seed=3, re_range=(2.0, 4.0))[0]
    mask = np.zeros((24, 24), int)
    mask[:3] = 1
    obs = Observation(image=m.obs.image, sigma=m.obs.sigma, psf=m.obs.psf, mask=mask, id="s0")
    model = load_recipe("sersic")
    gal = model.pack(obs, m.truth)
    rng = np.random.default_rng(0)
    chains, draws = 2, 40
    base = np.asarray(gal.values0, np.float64)
    samples = np.repeat(base[None, None], chains * draws, axis=0).reshape(chains, draws, -1).copy()
    for k in ("sersic_xc", "sersic_yc"):
        samples[..., model.keys.index(k)] += rng.normal(0, 0.05, (chains, draws))
    ll = pointwise_loglike(model, gal, samples, chunk=32)
    assert ll.shape == (chains, draws, 24 * 21)
    v = samples[1, 7]
    img = np.asarray(model.render(jnp.asarray(v, jnp.float32), gal), np.float64)
    use = np.asarray(gal.weight) > 0
    sig = np.asarray(gal.sigma, np.float64)
    direct = (-0.5 * ((np.asarray(gal.image) - img) / sig) ** 2 - np.log(sig * np.sqrt(2 * np.pi)))[use]
    np.testing.assert_allclose(ll[1, 7], direct, rtol=1e-4, atol=1e-4)
    total = float(gaussian_loglike(chi2_of(gal.image, jnp.asarray(img, jnp.float32), gal.sigma, gal.weight),
                                   gal.sigma, gal.weight))
    assert ll[1, 7].sum() == pytest.approx(total, rel=1e-4)

    keys, free = list(model.keys), list(model.free_keys)
    res = NutsResult(samples=samples[None], r_hat=np.ones((1, len(free))), ess_bulk=np.ones((1, len(free))),
                     divergences=np.zeros(1, int), mean_tree_steps=np.ones(1), step_size=np.ones((1, chains)),
                     accept_prob=np.ones(1), potential=-ll.sum(-1)[None], diverging=np.zeros((1, chains, draws), bool),
                     num_steps=np.ones((1, chains, draws), int), likelihood="gaussian", free_keys=free, keys=keys,
                     wall_time=0.0, compile_time=0.0)
    idata = to_inference_data(model, res, 0, galaxy_id="s0", log_likelihood=ll)
    a = _copy_run(runs["sersic"], tmp_path / "sersic", lambda t: t)
    (a / "posteriors").mkdir()
    idata.to_netcdf(str(a / "posteriors" / "s0.nc"))
    table = compare_runs([a, runs["bulge_disk"]])
    row = table[list(table["id"]).index("s0")]
    assert row["elpd_loo_sersic"] == pytest.approx(float(az.loo(idata)["elpd_loo"]))
    assert np.isfinite(row["elpd_loo_se_sersic"]) and str(row["preferred_loo"]) == ""  # one run has no LOO

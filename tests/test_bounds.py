"""Per-galaxy bounds: catalog columns ``<component>_<param>_lo`` / ``_hi`` (as ``galbayes
prepare --data-bounds`` writes them) replace the recipe's bounds, and so the uniform prior, of
that galaxy; bad bounds are an error naming the galaxy, and a catalog run goes on.

Checked against GalSim mocks: a galaxy whose true ``re`` lies above its given upper bound ends
on that bound, the same galaxy without bounds recovers the truth."""
from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

from galbayes.catalog import CatalogError, read_catalog
from galbayes.errors import InputError, ModelError
from galbayes.recipe import load_recipe

SIZE, PSF_SIZE = 48, 15


@pytest.fixture(scope="module")
def mocks():
    pytest.importorskip("galsim")
    from galbayes.mocks import sersic_mocks

    return sersic_mocks(2, size=SIZE, psf_size=PSF_SIZE, seed=5, re_range=(4.5, 6.0), n_range=(1.0, 2.0),
                        mag_range=(16.5, 17.0), q_range=(0.6, 0.9))


@pytest.fixture(scope="module")
def folder(mocks, tmp_path_factory):
    d = tmp_path_factory.mktemp("bounds")
    fits.PrimaryHDU(np.asarray(mocks[0].obs.psf, np.float32)).writeto(d / "psf.fits")
    for i, m in enumerate(mocks):
        fits.PrimaryHDU(np.asarray(m.obs.image, np.float32)).writeto(d / f"img{i}.fits")
        fits.PrimaryHDU(np.asarray(m.obs.sigma, np.float32)).writeto(d / f"sig{i}.fits")
    return d


def _catalog(d, rows, extra_cols):
    cols = ["id", "image", "sigma", "psf", "sersic_re", "sersic_mag"] + extra_cols
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows]
    path = d / f"cat_{len(list(d.glob('cat_*.csv')))}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_catalog_reads_bounds_columns_and_refuses_wrong_ones(folder):
    model = load_recipe("sersic")
    base = {"image": "img0.fits", "sigma": "sig0.fits", "psf": "psf.fits", "sersic_re": 3.0, "sersic_mag": 17}
    path = _catalog(folder, [dict(base, id="a", sersic_re_lo=1.5, sersic_re_hi=4.0, sersic_mag_hi=18.0),
                             dict(base, id="b")], ["sersic_re_lo", "sersic_re_hi", "sersic_mag_hi"])
    rows = {r.id: r for r in read_catalog(path, model=model)}
    assert rows["a"].bounds == {"sersic_re": (1.5, 4.0), "sersic_mag": (None, 18.0)}
    assert rows["b"].bounds is None                          # empty cells: the recipe's bounds
    bad = _catalog(folder, [dict(base, id="a", sersic_ree_lo=1.0)], ["sersic_ree_lo"])
    with pytest.raises(CatalogError, match="did you mean 'sersic_re_lo'"):
        read_catalog(bad, model=model)
    fixed = load_recipe("sersic")
    fixed_path = _catalog(folder, [dict(base, id="a", sersic_box_lo=-0.1)], ["sersic_box_lo"])
    assert "sersic_box" not in fixed.free_keys
    with pytest.raises(CatalogError, match="sersic_box.*fixes"):
        read_catalog(fixed_path, model=fixed)


def test_pack_applies_and_checks_bounds(mocks):
    model = load_recipe("sersic")
    obs = mocks[0].obs
    free = model.free_keys
    j_re, j_mag = free.index("sersic_re"), free.index("sersic_mag")
    default = model.pack(obs, mocks[0].init)
    gal = model.pack(obs, mocks[0].init, bounds={"sersic_re": (1.0, 9.0), "sersic_mag": (None, 19.0)})
    assert (float(gal.lo[j_re]), float(gal.hi[j_re])) == pytest.approx((1.0, 9.0))
    assert float(gal.lo[j_mag]) == pytest.approx(float(default.lo[j_mag]))        # None: the recipe's
    assert float(gal.hi[j_mag]) == pytest.approx(19.0)
    with pytest.raises(InputError, match=r"galaxy .*sersic_re.*inverted"):
        model.pack(obs, mocks[0].init, bounds={"sersic_re": (5.0, 2.0)})
    with pytest.raises(InputError, match="outside its bounds"):                     # a given start
        model.pack(obs, dict(mocks[0].init, sersic_re=8.0), bounds={"sersic_re": (1.0, 3.0)})
    init = {k: v for k, v in mocks[0].init.items() if k != "sersic_re"}            # a guessed start ...
    gal = model.pack(obs, init, bounds={"sersic_re": (1.0, 1.5)})                   # ... moves inside
    i_re = model.keys.index("sersic_re")
    assert 1.0 < float(gal.values0[i_re]) < 1.5
    with pytest.raises(ModelError, match="not free"):
        model.pack(obs, mocks[0].init, bounds={"sersic_box": (-0.1, 0.1)})


def test_fit_catalog_applies_per_galaxy_bounds(mocks, folder, tmp_path):
    from galbayes.pipeline import fit_catalog

    model = load_recipe("sersic")
    rows = []
    for gid, i, b in (("capped", 0, {"sersic_re_lo": 1.5, "sersic_re_hi": 3.0}), ("free", 0, {}),
                      ("other", 1, {"sersic_re_lo": 2.0, "sersic_re_hi": 12.0}),
                      ("inverted", 1, {"sersic_re_lo": 4.0, "sersic_re_hi": 3.0})):
        init = mocks[i].init
        rows.append({"id": gid, "image": f"img{i}.fits", "sigma": f"sig{i}.fits", "psf": "psf.fits",
                     "sersic_re": min(init["sersic_re"], 2.9) if gid == "capped" else init["sersic_re"],
                     "sersic_mag": init["sersic_mag"], **b})
    path = _catalog(folder, rows, ["sersic_re_lo", "sersic_re_hi"])
    table = fit_catalog(path, model, tmp_path / "out", batch_size=4, progress=False)
    by_id = {str(r["id"]): r for r in table}
    assert list(by_id) == ["capped", "free", "other", "inverted"]                  # nothing dropped
    assert "inverted" in str(by_id["inverted"]["status"]) and "galaxy inverted" in str(by_id["inverted"]["status"])
    for gid in ("capped", "free", "other"):
        assert str(by_id[gid]["status"]).startswith("ok"), by_id[gid]["status"]
    true_re = mocks[0].truth["sersic_re"]
    assert true_re > 4.0
    assert 2.9 < float(by_id["capped"]["sersic_re"]) <= 3.0                         # held by its bound
    assert abs(float(by_id["free"]["sersic_re"]) / true_re - 1) < 0.05              # the truth, unbounded
    assert abs(float(by_id["other"]["sersic_re"]) / mocks[1].truth["sersic_re"] - 1) < 0.05
    # a bound costs χ²: the capped fit is worse than the free one on the same image
    assert float(by_id["capped"]["chi2_red"]) > float(by_id["free"]["chi2_red"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["fingerprint"]["described"]["catalog"]["per_galaxy_bounds"] == ["sersic_re_hi", "sersic_re_lo"]

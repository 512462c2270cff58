"""Inputs as surveys ship them: σ / variance / ivar (weight) / rms maps, FITS paths naming an
extension, LSST-style MEFs (IMAGE / MASK / VARIANCE with bit planes), mask_bits, and σ
estimated from the image when there is no noise map (flagged in the status)."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from galbayes.catalog import CatalogError, read_catalog
from galbayes.data import Observation
from galbayes.errors import InputError

SIZE, PSF_SIZE = 48, 15
BITS = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5}


@pytest.fixture(scope="module")
def mock():
    pytest.importorskip("galsim")
    from galbayes.mocks import sersic_mocks

    return sersic_mocks(1, size=SIZE, psf_size=PSF_SIZE, seed=11, re_range=(3.0, 6.0), mag_range=(16.5, 17.0))[0]


@pytest.fixture(scope="module")
def files(mock, tmp_path_factory):
    """The mock as an LSST-style MEF (calexp.fits: IMAGE, MASK with MP_* planes, VARIANCE)
    and as separate image / σ / ivar / rms / 0-1 mask files, the rejected pixels the same."""
    d = tmp_path_factory.mktemp("survey")
    rng = np.random.default_rng(4)
    image = np.asarray(mock.obs.image, np.float32).copy()
    sigma = np.asarray(mock.obs.sigma, np.float32)
    var = (sigma.astype(np.float64) ** 2).astype(np.float32)
    mask = np.zeros(image.shape, np.int32)
    mask[np.asarray(mock.noiseless) > 0.05 * mock.noiseless.max()] |= 1 << BITS["DETECTED"]   # kept
    mask[:, :2] |= 1 << BITS["EDGE"]                                                          # kept
    bad = rng.choice(image.size, 30, replace=False)
    cr = rng.choice(image.size, 30, replace=False)
    sat = rng.choice(image.size, 20, replace=False)
    mask.flat[bad] |= 1 << BITS["BAD"]
    mask.flat[cr] |= 1 << BITS["CR"]
    mask.flat[sat] |= 1 << BITS["SAT"]
    image.flat[bad] = np.nan        # bad pixels: no data
    image.flat[cr] += 50.0          # cosmic rays
    var.flat[bad] = np.inf
    rejected = ((mask >> BITS["BAD"]) & 1 | (mask >> BITS["CR"]) & 1).astype(bool)
    hdr = fits.Header()
    for name, bit in BITS.items():
        hdr[f"HIERARCH MP_{name}" if len(name) > 5 else f"MP_{name}"] = bit    # as LSST writes them
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE"), fits.ImageHDU(mask, header=hdr, name="MASK"),
                  fits.ImageHDU(var, name="VARIANCE")]).writeto(d / "calexp.fits")
    fits.PrimaryHDU(np.asarray(mock.obs.psf, np.float32)).writeto(d / "psf.fits")
    clean = np.where(rejected, 0.0, image).astype(np.float32)
    s = np.where(rejected, 1.0, np.sqrt(var.astype(np.float64))).astype(np.float32)
    with np.errstate(divide="ignore"):
        ivar = np.where(rejected, 0.0, 1.0 / var.astype(np.float64)).astype(np.float32)
    for name, arr in (("img", clean), ("sigma", s), ("rms", s), ("ivar", ivar),
                      ("mask01", rejected.astype(np.uint8))):
        fits.PrimaryHDU(arr).writeto(d / f"{name}.fits")
    return {"dir": d, "rejected": rejected, "mask": mask, "sat": sat}


def _mef(d, gid="mef", **kw):
    return Observation.from_fits(image=d / "calexp.fits[IMAGE]", variance=d / "calexp.fits[VARIANCE]",
                                 mask=d / "calexp.fits[MASK]", psf=d / "psf.fits", id=gid, **kw)


def test_noise_forms_give_the_same_fit(mock, files):
    from galbayes.pipeline import fit
    from galbayes.recipe import load_recipe

    d = files["dir"]
    obs = [
        Observation.from_fits(image=d / "img.fits", sigma=d / "sigma.fits", mask=d / "mask01.fits",
                              psf=d / "psf.fits", id="sigma"),
        Observation.from_fits(image=d / "img.fits", ivar=d / "ivar.fits", psf=d / "psf.fits", id="ivar"),
        Observation.from_fits(image=d / "img.fits", rms=d / "rms.fits", mask=d / "mask01.fits",
                              psf=d / "psf.fits", id="rms"),
        _mef(d, mask_bits="BAD,CR"),
        Observation.from_fits(image=d / "calexp.fits[1]", variance=d / "calexp.fits[3]",
                              mask=d / "calexp.fits[MASK,1]", psf=d / "psf.fits", id="mef_index", mask_bits="0,3"),
    ]
    assert [o.noise for o in obs] == ["sigma", "ivar", "rms", "variance", "variance"]
    for o in obs:
        np.testing.assert_array_equal(o.weight == 0, files["rejected"], err_msg=o.id)
        np.testing.assert_allclose(o.sigma, obs[0].sigma, rtol=2e-7, err_msg=o.id)
        np.testing.assert_array_equal(o.image, obs[0].image, err_msg=o.id)
    out = fit(load_recipe("sersic"), obs, init=[mock.init] * len(obs), max_iter=10, lm_iter=25)
    t = out.table
    assert all(str(s) == "ok" for s in t["status"]), list(t["status"])
    ref = out.params("sigma")
    worst = 0.0
    for o in obs[1:]:
        p = out.params(o.id)
        for k, v in ref.items():
            worst = max(worst, abs(p[k] - v) / max(abs(v), 1.0))
    chi2 = np.asarray(t["chi2"], float)
    print(f"largest relative parameter difference to the sigma-map fit: {worst:.2e}; "
          f"chi2 spread {np.ptp(chi2) / chi2[0]:.2e}")
    assert worst < 1e-4
    np.testing.assert_allclose(chi2, chi2[0], rtol=1e-5)
    assert abs(ref["sersic_re"] / mock.truth["sersic_re"] - 1) < 0.1   # and it is a fit


def test_mask_bits_reject_exactly_the_named_planes(files):
    d, mask = files["dir"], files["mask"]
    for bits, planes in (("BAD,CR", (0, 3)), ("0,3", (0, 3)), (9, (0, 3)), ("9", (0, 3)), ("0x9", (0, 3)),
                         ([1], (1,)), ("SAT", (1,)), ("1,", (1,)), (["bad", 3, "sat"], (0, 1, 3)),
                         ("DETECTED", (5,))):
        o = _mef(d, gid="bits", mask_bits=bits)
        expect = np.zeros(mask.shape, bool)
        for b in planes:
            expect |= (mask >> b) & 1 == 1
        expect |= ~np.isfinite(fits.getdata(d / "calexp.fits", "VARIANCE"))     # inf variance: masked
        np.testing.assert_array_equal(o.weight == 0, expect, err_msg=str(bits))
    # DETECTED and EDGE pixels are kept; without mask_bits every non-zero pixel is masked
    assert (_mef(d, gid="b", mask_bits="BAD,CR").weight[:, :2] > 0).any()
    with pytest.raises(InputError, match="unmasked NaN"):   # DETECTED etc. masked, but the NaN
        Observation.from_fits(image=d / "calexp.fits[IMAGE]", sigma=d / "sigma.fits",
                              mask=d / "calexp.fits[MASK]", mask_bits="CR", psf=d / "psf.fits", id="g")
    for bits, message in (("NOPE", r"galaxy g: mask_bits: unknown mask plane 'NOPE' \(known planes: BAD, CR"),
                          ("0,99", "bit number 99 outside"), (-1, "bitmask must be")):
        with pytest.raises(InputError, match=message):
            _mef(d, gid="g", mask_bits=bits)
    with pytest.raises(InputError, match="mask_keep.*mask_bits"):
        _mef(d, gid="g", mask_bits=1, mask_keep=2)
    # names need the header: in memory only numbers
    img = np.zeros((8, 8))
    with pytest.raises(InputError, match="no MP_<NAME>"):
        Observation(img, np.ones((8, 8)), np.ones((1, 1)), mask=np.zeros((8, 8), int), mask_bits="BAD")


def test_extension_syntax_and_missing_extension(files):
    d = files["dir"]
    a = fits.getdata(d / "calexp.fits", "VARIANCE")
    from galbayes.data import load_fits, split_extension

    np.testing.assert_array_equal(load_fits(f"{d}/calexp.fits[VARIANCE]"), a)
    np.testing.assert_array_equal(load_fits(f"{d}/calexp.fits[3]"), a)
    np.testing.assert_array_equal(load_fits(f"{d}/calexp.fits[variance, 1]"), a)
    assert split_extension("x.fits[SCI,2]") == ("x.fits", ("SCI", 2))
    assert split_extension("x.fits") == ("x.fits", None)
    with pytest.raises(InputError) as exc:
        Observation.from_fits(image=d / "calexp.fits[IMAGE]", variance=d / "calexp.fits[VARIANS]",
                              psf=d / "psf.fits", id="gal7")
    msg = str(exc.value)
    assert "galaxy gal7" in msg and "calexp.fits" in msg and "'VARIANS'" in msg and "3 VARIANCE" in msg
    with pytest.raises(InputError, match=r"galaxy gal7: image: .*calexp.fits has no extension 9"):
        Observation.from_fits(image=d / "calexp.fits[9]", sigma=d / "sigma.fits", psf=d / "psf.fits", id="gal7")


def test_noise_edge_cases():
    rng = np.random.default_rng(0)
    img, psf = rng.normal(size=(16, 16)), np.ones((3, 3))
    iv = np.full(img.shape, 4.0)
    iv[2, 3] = 0.0
    img_nan = img.copy()
    img_nan[2, 3] = np.nan                      # no data where ivar = 0
    with np.errstate(all="raise"):              # no division by zero anywhere
        o = Observation(img_nan, ivar=iv, psf=psf, id="g")
    assert o.weight[2, 3] == 0 and o.weight.sum() == img.size - 1 and np.all(np.isfinite(o.sigma))
    np.testing.assert_allclose(o.sigma[0, 0], 0.5)
    var = np.full(img.shape, 0.25)
    var[1, 1], var[4, 4] = np.inf, np.nan
    o = Observation(img, variance=var, psf=psf)
    assert o.weight[1, 1] == 0 and o.weight[4, 4] == 0 and o.weight.sum() == img.size - 2
    for kw, message in ((dict(variance=np.where(var == 0.25, -0.25, var)), "galaxy g7: variance: .*variance ≤ 0"),
                        (dict(variance=np.zeros(img.shape)), "galaxy g7: variance"),
                        (dict(ivar=-iv), "galaxy g7: ivar: .*< 0"),
                        (dict(ivar=np.full(img.shape, np.inf)), "galaxy g7: ivar"),
                        (dict(sigma=np.full(img.shape, np.nan)), "galaxy g7: sigma"),
                        (dict(sigma=np.ones(img.shape), ivar=iv), "give one noise map")):
        with pytest.raises(InputError, match=message):
            Observation(img, psf=psf, id="g7", **kw)
    # a negative variance inside the mask is fine
    v2 = var.copy()
    v2[5, 5] = -1.0
    m = np.zeros(img.shape, int)
    m[5, 5] = 1
    assert Observation(img, variance=v2, psf=psf, mask=m).weight[5, 5] == 0


def test_sigma_estimated_from_the_image(mock, files, tmp_path):
    true = np.asarray(mock.obs.sigma, np.float64)
    # gain known (header GAIN): background rms + source Poisson noise
    fits.PrimaryHDU(np.asarray(mock.obs.image, np.float32), header=fits.Header([("GAIN", 500.0)])
                    ).writeto(tmp_path / "img_gain.fits")
    o = Observation.from_fits(image=tmp_path / "img_gain.fits", psf=files["dir"] / "psf.fits", id="e")
    assert o.noise == "estimated" and o.notes == ["sigma estimated from image (background rms + Poisson, gain 500)"]
    ratio = o.sigma / true
    sky = np.asarray(mock.noiseless) < 1e-3 * mock.noiseless.max()
    src = np.asarray(mock.noiseless) > 0.3 * mock.noiseless.max()
    print(f"estimated/true sigma: median {np.median(ratio):.3f}, sky {np.median(ratio[sky]):.3f}, "
          f"source {np.median(ratio[src]):.3f}")
    assert abs(np.median(ratio[sky]) - 1) < 0.1 and abs(np.median(ratio[src]) - 1) < 0.1
    assert abs(np.median(ratio) - 1) < 0.1
    # no gain: background only (said so), still right on the sky
    fits.PrimaryHDU(np.asarray(mock.obs.image, np.float32)).writeto(tmp_path / "img.fits")
    o2 = Observation.from_fits(image=tmp_path / "img.fits", psf=files["dir"] / "psf.fits", id="e2")
    assert "no gain" in o2.notes[0] and abs(np.median((o2.sigma / true)[sky]) - 1) < 0.1
    # a gain column overrides the header; the catalog route, and the status of a fit
    cat = tmp_path / "cat.csv"
    d = files["dir"]
    cat.write_text("id,image,psf,sigma,variance,ivar,weight,rms,mask,mask_bits,gain\n"
                   f"est,img_gain.fits,{d}/psf.fits,,,,,,,,\n"
                   f"est_g,img.fits,{d}/psf.fits,,,,,,,,250\n"
                   f"mef,{d}/calexp.fits[IMAGE],{d}/psf.fits,,{d}/calexp.fits[VARIANCE],,,,{d}/calexp.fits[MASK],\"BAD,CR\",\n"
                   f"wt,{d}/img.fits,{d}/psf.fits,,,,{d}/ivar.fits,,,,\n"
                   f"rms,{d}/img.fits,{d}/psf.fits,,,,,{d}/rms.fits,{d}/mask01.fits,,\n")
    rows = {r.id: r for r in read_catalog(cat)}
    loaded = {k: r.load() for k, r in rows.items()}
    assert loaded["est_g"].notes == ["sigma estimated from image (background rms + Poisson, gain 250)"]
    assert [loaded[k].noise for k in ("est", "mef", "wt", "rms")] == ["estimated", "variance", "ivar", "rms"]
    for k in ("mef", "wt"):
        np.testing.assert_array_equal(loaded[k].weight == 0, files["rejected"], err_msg=k)
        np.testing.assert_allclose(loaded[k].sigma, loaded["rms"].sigma, rtol=2e-7, err_msg=k)
    assert {p.name for p in rows["mef"].files()} == {"calexp.fits", "psf.fits"}
    bad = tmp_path / "bad.csv"
    bad.write_text(f"id,image,psf,sigma,ivar\nx,img.fits,{d}/psf.fits,{d}/sigma.fits,{d}/ivar.fits\n")
    with pytest.raises(CatalogError, match=r"row 1 \(id x\): give one noise map, got \['sigma', 'ivar'\]"):
        read_catalog(bad)

    from galbayes.pipeline import fit_catalog
    from galbayes.recipe import load_recipe

    one = tmp_path / "one.csv"
    one.write_text("id,image,psf\n" + "".join(f"e{i},img_gain.fits,{d}/psf.fits\n" for i in range(5))
                   + f"missing,calexp_nope.fits[IMAGE],{d}/psf.fits\n")
    table = fit_catalog(one, load_recipe("sersic"), tmp_path / "out", progress=False, blocks=False,
                        max_iter=10, lm_iter=25)
    status = [str(s) for s in table["status"]]
    assert status[:5] == ["ok; sigma estimated from image (background rms + Poisson, gain 500)"] * 5, status
    assert status[5].startswith("error: galaxy missing: image: file not found") and "calexp_nope.fits" in status[5]

"""Bad inputs raise galbayes.InputError / ModelError (ValueError subclasses) whose message
names the galaxy, the array or parameter, and the problem."""
import numpy as np
import pytest

import galbayes as gb
from galbayes import InputError, ModelError

SHAPE = (16, 18)
GID = "J1234+5678"


def good_arrays():
    rng = np.random.default_rng(0)
    return dict(image=rng.normal(size=SHAPE), sigma=np.full(SHAPE, 0.5), psf=np.ones((5, 5)))


def make_obs(**over):
    kw = dict(good_arrays(), id=GID)
    kw.update(over)
    return gb.Observation(**kw)


def check_message(excinfo, what, *words):
    err = excinfo.value
    msg = str(err)
    assert GID in msg, msg
    assert what in msg, msg
    for w in words:
        assert w in msg, msg
    assert err.galaxy == GID
    assert err.what == what


def test_error_classes_are_value_errors():
    assert issubclass(InputError, ValueError)
    assert issubclass(ModelError, ValueError)


def test_good_observation_is_accepted():
    obs = make_obs()
    assert obs.shape == SHAPE and obs.n_pixels == SHAPE[0] * SHAPE[1]
    assert obs.image.dtype == np.float32 and obs.sigma.dtype == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_unmasked_image_pixel(bad):
    image = good_arrays()["image"]
    image[3, 7] = bad
    with pytest.raises(InputError) as e:
        make_obs(image=image)
    check_message(e, "image", "NaN/inf", "(3, 7)")


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_bad_sigma(bad):
    sigma = np.full(SHAPE, 0.5)
    sigma[5, 2] = bad
    with pytest.raises(InputError) as e:
        make_obs(sigma=sigma)
    check_message(e, "sigma", "(5, 2)")


def test_nan_in_masked_pixels_is_accepted():
    image = good_arrays()["image"]
    sigma = np.full(SHAPE, 0.5)
    mask = np.zeros(SHAPE, int)
    image[3, 7] = np.nan
    image[0, 0] = np.inf
    sigma[8, 8] = np.nan
    sigma[9, 9] = 0.0
    mask[3, 7] = mask[0, 0] = mask[8, 8] = mask[9, 9] = 1
    obs = make_obs(image=image, sigma=sigma, mask=mask)
    assert obs.n_pixels == SHAPE[0] * SHAPE[1] - 4
    assert np.all(np.isfinite(obs.image)) and np.all(np.isfinite(obs.sigma)) and np.all(obs.sigma > 0)
    assert obs.weight[3, 7] == 0 and obs.weight[4, 7] == 1
    # ... and the masked pixels do not reach the likelihood
    model = gb.Model([gb.Component("c", "gaussian", {"fwhm": 3.0, "mag": 20.0})])
    gal = model.pack(obs)
    assert np.isfinite(float(model.chi2(gal.values0, gal)))


def test_segmentation_mask_keep():
    mask = np.zeros(SHAPE, int)
    mask[:3] = 5   # the galaxy's own segment: kept
    mask[-2:] = 9  # another source: masked
    obs = make_obs(mask=mask, mask_keep=5)
    assert obs.n_pixels == SHAPE[0] * SHAPE[1] - 2 * SHAPE[1]


def test_psf_with_nan():
    psf = np.ones((5, 5))
    psf[2, 2] = np.nan
    with pytest.raises(InputError) as e:
        make_obs(psf=psf)
    check_message(e, "PSF", "NaN")


@pytest.mark.parametrize("psf", [np.zeros((5, 5)), -np.ones((5, 5)), np.array([[1.0, -2.0], [0.5, 0.0]])])
def test_psf_with_non_positive_sum(psf):
    with pytest.raises(InputError) as e:
        make_obs(psf=psf)
    check_message(e, "PSF", "sum")


def test_psf_not_2d():
    with pytest.raises(InputError) as e:
        make_obs(psf=np.ones((3, 5, 5)))
    check_message(e, "PSF", "2-D")


@pytest.mark.parametrize("what, value", [
    ("sigma", np.ones((16, 17))),
    ("sigma", np.ones((18, 16))),
    ("mask", np.zeros((15, 18))),
])
def test_shape_mismatch(what, value):
    with pytest.raises(InputError) as e:
        make_obs(**{what: value})
    check_message(e, what, "shape", str(SHAPE))


def test_image_not_2d():
    arr = good_arrays()
    with pytest.raises(InputError) as e:
        make_obs(image=arr["image"][None], sigma=arr["sigma"][None])
    check_message(e, "image", "2-D")


def test_fully_masked_image():
    with pytest.raises(InputError) as e:
        make_obs(mask=np.ones(SHAPE, int))
    check_message(e, "mask", "every pixel is masked")
    # with a segmentation map where nothing equals 0 or the kept value
    with pytest.raises(InputError) as e:
        make_obs(mask=np.full(SHAPE, 3), mask_keep=4)
    check_message(e, "mask", "masked")


def test_bad_zero_point_and_pixel_scale():
    with pytest.raises(InputError) as e:
        make_obs(zp=np.nan)
    check_message(e, "zp")
    for scale in (0.0, -0.4, np.nan):
        with pytest.raises(InputError) as e:
            make_obs(pixel_scale=scale)
        check_message(e, "pixel_scale")


# ----------------------------------------------------------------------------- model side
def sersic_model(**params):
    p = {"re": 4.0, "n": 2.0, "mag": 18.0}
    p.update(params)
    return gb.Model([gb.Component("bulge", "sersic", p)])


@pytest.mark.parametrize("param, value", [("re", 600.0), ("re", 0.05), ("n", 12.0), ("q", 1.2), ("mag", -3.0)])
def test_init_outside_default_bounds(param, value):
    model = sersic_model(**{param: value})
    with pytest.raises(InputError) as e:
        model.pack(make_obs())
    check_message(e, f"bulge_{param}", "outside its bounds", f"{value:g}")


def test_init_outside_user_bounds_and_per_galaxy_init():
    model = sersic_model(re={"init": 4.0, "bounds": (1.0, 10.0)})
    model.pack(make_obs())  # fine
    with pytest.raises(InputError) as e:
        model.pack(make_obs(), {"bulge_re": 12.0})
    check_message(e, "bulge_re", "outside its bounds", "[1, 10]")
    # centre outside the image extent [-0.5, n-0.5]
    with pytest.raises(InputError) as e:
        model.pack(make_obs(), {"bulge_xc": SHAPE[1] + 2.0})
    check_message(e, "bulge_xc", "outside")


def test_inverted_bounds():
    with pytest.raises(ValueError, match="bounds"):
        gb.Param(bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="bounds"):
        gb.Param(bounds=(1.0, 1.0))
    with pytest.raises(ModelError) as e:
        sersic_model(re={"init": 1.5, "bounds": (2.0, 1.0)})
    assert "bulge.re" in str(e.value) and "bounds" in str(e.value)


def test_non_positive_bounds_for_log_parameter():
    with pytest.raises(ModelError) as e:
        sersic_model(re={"init": 1.0, "bounds": (0.0, 5.0)})
    assert "bulge_re" in str(e.value)


def test_unknown_profile_name():
    with pytest.raises(ModelError) as e:
        gb.Model([gb.Component("bulge", "sersik", {})])
    assert "sersik" in str(e.value)
    assert "sersic" in str(e.value)  # lists what is available


def test_unknown_parameter_name():
    with pytest.raises(ModelError) as e:
        gb.Model([gb.Component("bulge", "sersic", {"reff": 3.0})])
    msg = str(e.value)
    assert "bulge" in msg and "reff" in msg


def test_unknown_parameter_setting():
    with pytest.raises(ModelError) as e:
        sersic_model(re={"init": 3.0, "bonds": (1, 5)})
    assert "bulge.re" in str(e.value) and "bonds" in str(e.value)


def test_bad_shared_parameter_reference():
    comps = [gb.Component("bulge", "sersic", {}), gb.Component("disk", "exponential", {"xc": "bulge.xcen"})]
    with pytest.raises(ModelError) as e:
        gb.Model(comps)
    assert "disk.xc" in str(e.value) and "bulge.xcen" in str(e.value)


def test_unknown_initial_value_key():
    model = sersic_model()
    with pytest.raises(ModelError) as e:
        model.pack(make_obs(), {"bulge_reff": 3.0})
    assert "bulge_reff" in str(e.value)


def test_arcsec_model_needs_pixel_scale():
    model = gb.Model([gb.Component("bulge", "sersic", {"re": 1.0, "mag": 18.0})], size_unit="arcsec")
    with pytest.raises(InputError) as e:
        model.pack(make_obs())
    check_message(e, "pixel_scale")
    gal = model.pack(make_obs(pixel_scale=0.25))
    assert float(gal.scale) == 0.25


def test_model_without_free_parameters():
    with pytest.raises(ModelError, match="free"):
        gb.Model([gb.Component("s", "sky", {"sky": {"init": 0.0, "fixed": True}})])


# ----------------------------------------------------------------------------- FITS
def test_missing_fits_file(tmp_path):
    path = tmp_path / "nope.fits"
    with pytest.raises(InputError) as e:
        gb.load_fits(path)
    assert "nope.fits" in str(e.value) and "not found" in str(e.value)
    with pytest.raises(InputError) as e:
        gb.load_fits(path, galaxy=GID, what="sigma")
    check_message(e, "sigma", "nope.fits")


def test_from_fits_names_the_missing_file(tmp_path):
    fits = pytest.importorskip("astropy.io.fits")
    arr = good_arrays()
    for name in ("image", "psf"):
        fits.PrimaryHDU(arr[name]).writeto(tmp_path / f"{name}.fits")
    with pytest.raises(InputError) as e:
        gb.Observation.from_fits(image=tmp_path / "image.fits", sigma=tmp_path / "sigma.fits",
                                 psf=tmp_path / "psf.fits", id=GID)
    check_message(e, "sigma", "sigma.fits")
    fits.PrimaryHDU(arr["sigma"]).writeto(tmp_path / "sigma.fits")
    obs = gb.Observation.from_fits(image=tmp_path / "image.fits", sigma=tmp_path / "sigma.fits",
                                   psf=tmp_path / "psf.fits", id=GID)
    np.testing.assert_allclose(obs.image, arr["image"].astype(np.float32))


def test_fits_without_an_image(tmp_path):
    fits = pytest.importorskip("astropy.io.fits")
    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])])]).writeto(path)
    with pytest.raises(InputError) as e:
        gb.load_fits(path, galaxy=GID, what="image")
    check_message(e, "image", "2-D")
    not_fits = tmp_path / "junk.fits"
    not_fits.write_text("this is not FITS")
    with pytest.raises(InputError) as e:
        gb.load_fits(not_fits, galaxy=GID, what="mask")
    check_message(e, "mask", "junk.fits")


# ----------------------------------------------------------------------------- catalog columns
def _catalog(tmp_path, extra: dict):
    """A one-row CSV catalog with the standard columns plus ``extra`` columns."""
    cols = {"id": "g1", "image": "i.fits", "sigma": "s.fits", "psf": "p.fits", **extra}
    path = tmp_path / "cat.csv"
    path.write_text(",".join(cols) + "\n" + ",".join(str(v) for v in cols.values()) + "\n")
    return path


@pytest.mark.parametrize("column, close", [
    ("sersc_re", "sersic_re"),     # misspelt component, close to a parameter
    ("sersic_ree", "sersic_re"),   # component prefix, no such parameter
    ("Sersic_re", "sersic_re"),    # case
    ("sersic_reff", "sersic_re"),
    ("sersicn", "sersic_n"),       # underscore missing
    ("sersic_", None),
])
def test_parameter_like_catalog_column_is_an_error_naming_the_close_match(tmp_path, column, close):
    from galbayes.catalog import CatalogError, read_catalog

    model = gb.Model([gb.Component("sersic", "sersic", {"re": 4.0, "n": 2.0, "mag": 18.0})])
    path = _catalog(tmp_path, {column: 3.0, "sersic_re": 2.0})
    with pytest.raises(CatalogError) as e:
        read_catalog(path, model=model)
    msg = str(e.value)
    assert f"column {column!r} names no parameter" in msg and str(path) in msg
    if close:
        assert f"did you mean {close!r}?" in msg
    # without a model the column cannot be judged and is carried along
    assert read_catalog(path)[0].id == "g1"


def test_other_catalog_columns_are_allowed(tmp_path):
    from galbayes.catalog import read_catalog

    model = sersic_model()
    extra = {"ra": 150.1, "dec": 2.2, "z": 0.05, "notes": "merger?", "redshift": 0.1, "objid": 7,
             "mag_r": 17.2, "re_kpc": 3.0, "bulge_re": 2.5, "bulge_n": 3.0}
    rows = read_catalog(_catalog(tmp_path, extra), model=model)
    assert rows[0].init == {"bulge_re": 2.5, "bulge_n": 3.0}


@pytest.mark.parametrize("column, meant", [("mask_kep", "mask_keep"), ("pixelscale", "pixel_scale"),
                                           ("sigma_", "sigma")])
def test_misspelt_standard_column_is_an_error(tmp_path, column, meant):
    from galbayes.catalog import CatalogError, read_catalog

    with pytest.raises(CatalogError, match=rf"column {column!r} is not a catalog column; did you mean {meant!r}"):
        read_catalog(_catalog(tmp_path, {column: 3}), model=sersic_model())


def test_parameter_like_rule():
    from galbayes.catalog import parameter_like

    model = gb.Model([gb.Component("bulge", "sersic", {}), gb.Component("disk", "exponential", {})])
    assert parameter_like("bulge_re", model) is None          # a parameter
    assert parameter_like("disk_rss", model) == "disk_rs"   # exponential disk: scale length rs
    assert parameter_like("dsk_rs", model) == "disk_rs"
    assert parameter_like("bulge_rs", model) is not None       # a parameter of the other component
    assert parameter_like("disk_colour", model) is not None    # component prefix
    for ok in ("ra", "dec", "z", "notes", "redshift", "id_sdss", "re", "n", "mag"):
        assert parameter_like(ok, model) is None, ok

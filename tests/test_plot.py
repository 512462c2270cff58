"""galbayes.plot: every figure renders to a non-empty PNG (Agg) with the expected axes, on
synthetic inputs and on a real image block written by a quick catalog fit."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402

import galbayes as gb  # noqa: E402
from galbayes import plot  # noqa: E402
from galbayes.recipe import load_recipe  # noqa: E402


def png_ok(fig, min_bytes=5_000):
    """Render to PNG and check it decodes to a non-blank image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    data = buf.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes
    img = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert np.ptp(img[..., :3]) > 0.1          # not a blank canvas
    return img


def sersic_scene(shape=(40, 44), seed=0):
    """Data, model, σ, weight and two component images (numpy only)."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    xc, yc, pa, q = 21.3, 19.6, 30.0, 0.6
    r = plot._ellipse_radius(shape, xc, yc, pa, q)
    bulge = 2.0 * np.exp(-7.67 * ((r / 2.5) ** 0.25 - 1)) / np.exp(7.67)
    disk = 0.5 * np.exp(-r / 6.0)
    model = bulge + disk
    sigma = np.full(shape, 0.02)
    rng = np.random.default_rng(seed)
    data = model + rng.normal(size=shape) * sigma
    weight = np.ones(shape)
    weight[2:6, 30:36] = 0.0
    return dict(data=data, model=model, sigma=sigma, weight=weight,
                components={"bulge": bulge, "disk": disk}), dict(xc=xc, yc=yc, pa=pa, q=q)


# --------------------------------------------------------------------------- helpers
def test_elliptical_profile_constant_image():
    shape = (31, 31)
    prof = plot.elliptical_profile(np.full(shape, 3.0), 15, 15, 20.0, 0.5, sigma=np.full(shape, 2.0),
                                   r_max=14)
    assert np.allclose(prof["mean"], 3.0)
    assert np.allclose(prof["err"], 2.0 / np.sqrt(prof["n"]))
    assert np.all(np.diff(prof["r"]) > 0) and prof["r"].max() < 14


def test_elliptical_profile_follows_the_major_axis():
    # an elongated exponential: in annuli of its own geometry the profile is exp(-r/rs)
    shape = (61, 61)
    r = plot._ellipse_radius(shape, 30.0, 30.0, 60.0, 0.4)
    prof = plot.elliptical_profile(np.exp(-r / 5.0), 30.0, 30.0, 60.0, 0.4, r_max=25)
    sel = prof["r"] > 3
    assert np.allclose(prof["mean"][sel], np.exp(-prof["r"][sel] / 5.0), rtol=0.05)


def test_ellipse_radius_matches_galbayes_geometry():
    from galbayes.geometry import ellipse_radius, pixel_grid

    shape = (17, 23)
    ours = plot._ellipse_radius(shape, 9.3, 7.1, -35.0, 0.55)
    ref = np.asarray(ellipse_radius(pixel_grid(shape), 9.3, 7.1, -35.0, 0.55))
    assert np.allclose(ours, ref, atol=1e-4)


def test_r_squared():
    x = np.linspace(0, 1, 20)
    assert plot.r_squared(x, x) == pytest.approx(1.0)
    assert plot.r_squared(np.full(20, x.mean()), x) == pytest.approx(0.0)
    assert np.isnan(plot.r_squared(np.ones(3), np.ones(3)))


def test_model_geometry_uses_brightest_component():
    model = load_recipe("bulge_disk")
    vals = {"bulge_xc": 10.0, "bulge_yc": 12.0, "bulge_pa": 5.0, "bulge_q": 0.9, "bulge_mag": 19.0,
            "disk_pa": 40.0, "disk_q": 0.5, "disk_mag": 18.0}
    g = plot.model_geometry(model, vals)
    assert g == {"xc": 10.0, "yc": 12.0, "pa": 40.0, "q": 0.5}   # shared centre, disk's axis


# --------------------------------------------------------------------------- figures, synthetic
def test_fit_figure_from_arrays_single_component():
    arrays, geom = sersic_scene()
    arrays["components"] = {"sersic": arrays["model"]}
    fig = plot.fit_figure(**arrays, **geom, title="single")
    assert len(fig.axes) == 6          # model, data, residual, histogram, profile, residual profile
    png_ok(fig)


def test_fit_figure_from_arrays_with_components():
    arrays, geom = sersic_scene()
    fig = plot.fit_figure(**arrays, geometry=geom, pixel_scale=0.396)
    assert len(fig.axes) == 8          # + bulge and disk images (Fig. B.6)
    titles = [ax.get_title() for ax in fig.axes]
    assert "bulge" in titles and "disk" in titles
    # profile axis: data points, model line and one line per component
    prof_ax = fig.axes[-2]
    labels = [line.get_label() for line in prof_ax.get_lines()]
    assert {"model", "bulge", "disk"} <= set(labels)
    png_ok(fig)


def test_fit_figure_defaults_and_errors():
    arrays, _ = sersic_scene()
    fig = plot.fit_figure(data=arrays["data"], model=arrays["model"])   # geometry from moments
    assert len(fig.axes) == 6
    png_ok(fig)
    with pytest.raises(ValueError):
        plot.fit_figure(data=arrays["data"], model=arrays["model"][:-1])
    with pytest.raises(ValueError):
        plot.fit_figure()


def test_images_are_shown_with_origin_lower():
    arrays, geom = sersic_scene()
    fig = plot.fit_figure(**arrays, geometry=geom)
    ims = [im for ax in fig.axes for im in ax.get_images()]
    assert ims and all(im.origin == "lower" for im in ims)


def test_comparison_figure():
    rng = np.random.default_rng(1)
    ref = {"mag": rng.uniform(16, 19, 50), "sersic_pa": rng.uniform(-90, 90, 50), "n": rng.uniform(0.5, 6, 50)}
    fit = {k: v + rng.normal(0, 0.05, 50) for k, v in ref.items()}
    fit["sersic_pa"] = fit["sersic_pa"] + 180.0 * rng.integers(-1, 2, 50)    # same ellipses
    fig = plot.comparison_figure(fit, ref, title="test")
    assert len(fig.axes) == 3
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert all(t.startswith("R² = ") for t in texts) and len(texts) == 3
    assert all(float(t.split("=")[1]) > 0.99 for t in texts)   # pa compared modulo 180°
    png_ok(fig)
    with pytest.raises(ValueError):
        plot.comparison_figure({"a": [1, 2]}, {"b": [1, 2]})


def test_error_comparison_figure_dict_and_array():
    rng = np.random.default_rng(2)
    vals = {"re": rng.uniform(2, 9, 6), "n": rng.uniform(1, 4, 6)}
    cov = {k: 0.05 * v for k, v in vals.items()}
    boot = {k: 0.08 * v for k, v in vals.items()}
    fig = plot.error_comparison_figure(vals, cov, boot, galaxy_labels=[f"g{i}" for i in range(6)])
    assert len(fig.axes) == 2
    png_ok(fig)
    arr = np.column_stack([vals["re"], vals["n"]])
    fig = plot.error_comparison_figure(arr, 0.05 * arr, 0.08 * arr, labels=["re", "n"], centre=True)
    assert len(fig.axes) == 2
    png_ok(fig)
    with pytest.raises(ValueError):
        plot.error_comparison_figure(arr, arr, arr)          # labels needed for arrays


def test_corner_with_laplace_dict_and_inference_data():
    rng = np.random.default_rng(3)
    mean = np.array([5.0, 2.0, 18.0])
    cov = np.array([[0.04, -0.01, 0.0], [-0.01, 0.01, 0.0], [0.0, 0.0, 0.0004]])
    draws = rng.multivariate_normal(mean, cov, size=2000)
    params = ["re", "n", "mag"]
    samples = {p: draws[:, i] for i, p in enumerate(params)}
    fig = plot.corner_with_laplace(samples, mean, cov, params, truths={"re": 5.1, "n": 1.9, "mag": 18.0})
    assert len(fig.axes) == 6          # P(P+1)/2 panels
    # two Laplace ellipses (1σ, 2σ) in each of the 3 off-diagonal panels
    from matplotlib.patches import Ellipse

    assert sum(isinstance(pt, Ellipse) for ax in fig.axes for pt in ax.patches) == 6
    png_ok(fig)

    az = pytest.importorskip("arviz")
    idata = az.from_dict(posterior={p: draws[:, i].reshape(2, 1000) for i, p in enumerate(params)})
    fig = plot.corner_with_laplace(idata, dict(zip(params, mean)), cov[:2, :2], params[:2])
    assert len(fig.axes) == 3
    png_ok(fig)


def scene_model():
    return gb.Model([
        gb.Component("gal", "sersic", dict(xc=20.0, yc=14.0, pa=30.0, q=0.5, re=4.0, n=1.5, mag=18.0)),
        gb.Component("star", "point", dict(xc=8.0, yc=25.0, mag=19.0)),
        gb.Component("sky", "sky", dict(sky=gb.Param(init=0.0, fixed=True))),
    ])


def test_scene_images_and_preview():
    model = scene_model()
    k = np.arange(9) - 4
    psf = np.exp(-0.5 * (k[:, None] ** 2 + k[None, :] ** 2) / 1.5**2)
    imgs = plot.scene_images(model, (32, 40), {"gal_mag": 17.5}, psf=psf)
    flux = 10 ** (-0.4 * (17.5 - 22.5)) + 10 ** (-0.4 * (19.0 - 22.5))
    assert imgs["unconvolved"].shape == (32, 40)
    assert imgs["unconvolved"].sum() == pytest.approx(flux, rel=0.02)
    assert imgs["convolved"].sum() == pytest.approx(flux, rel=0.03)
    assert set(imgs["components"]) == {"gal", "star", "sky"}
    # the PSF spreads the point source: a lower peak after convolution
    assert imgs["convolved"][25, 8] < imgs["unconvolved"][25, 8]
    # the galaxy's brightest pixel is at its centre (row yc, column xc): origin conventions
    g = imgs["components"]["gal"]
    assert np.unravel_index(np.argmax(g), g.shape) == (14, 20)
    fig = plot.scene_preview(model, (32, 40), {"gal_mag": 17.5}, psf=psf, title="scene")
    assert len(fig.axes) == 3          # (a), (b), colour bar
    png_ok(fig)
    with pytest.raises(KeyError):
        plot.scene_images(model, (32, 40), {"nope_mag": 1.0})


def test_scene_preview_from_observation():
    model = scene_model()
    obs = gb.Observation(image=np.zeros((32, 40)), sigma=np.ones((32, 40)), psf=np.ones((3, 3)))
    fig = plot.scene_preview(model, obs)
    assert len(fig.axes) == 3
    png_ok(fig)


# --------------------------------------------------------------------------- a real block file
@pytest.fixture(scope="module")
def catalog_run(tmp_path_factory):
    """A quick catalog fit of two small bulge + disk mocks (rendered by galbayes, Gaussian noise)."""
    from galbayes.pipeline import fit_catalog

    out = tmp_path_factory.mktemp("plotrun")
    model = load_recipe("bulge_disk")
    shape = (40, 40)
    k = np.arange(11) - 5
    psf = np.exp(-0.5 * (k[:, None] ** 2 + k[None, :] ** 2) / 1.3**2)
    psf /= psf.sum()
    rng = np.random.default_rng(4)
    truth = {"bulge_xc": 19.6, "bulge_yc": 20.3, "bulge_pa": 10.0, "bulge_q": 0.8, "bulge_re": 2.0,
             "bulge_n": 3.0, "bulge_mag": 18.5, "disk_pa": 50.0, "disk_q": 0.5, "disk_rs": 5.0,
             "disk_mag": 17.5}
    rows = []
    for i in range(2):
        obs0 = gb.Observation(image=np.zeros(shape), sigma=np.ones(shape), psf=psf)
        clean = gb.render_model(model, obs0, truth)
        sigma = np.full(shape, 0.02)
        mask = np.zeros(shape, np.int16)
        mask[30:34, 3:8] = 1
        for what, arr in (("image", clean + rng.normal(size=shape) * sigma), ("sigma", sigma), ("psf", psf),
                          ("mask", mask)):
            fits.writeto(out / f"g{i}_{what}.fits", np.asarray(arr), overwrite=True)
        rows.append({"id": f"gal {i}", "image": f"g{i}_image.fits", "sigma": f"g{i}_sigma.fits",
                     "psf": f"g{i}_psf.fits", "mask": f"g{i}_mask.fits",
                     **{k: v * (1.05 if k.endswith(("_re", "_rs")) else 1.0) for k, v in truth.items()}})
    Table(rows=rows).write(out / "catalog.csv", format="ascii.csv")
    fit_catalog(out / "catalog.csv", model, out / "run", batch_size=2, progress=False, max_iter=20, polish="none")
    return model, out / "run"


def test_fit_figure_from_block(catalog_run):
    model, run = catalog_run
    block = run / "blocks" / "gal_0.fits"           # ids are made file-name safe
    assert block.exists()
    blk = plot.read_block(block)
    assert set(blk["components"]) == {"bulge", "disk"}
    assert blk["weight"].sum() == blk["data"].size - 20       # the masked 4×5 box
    fig = plot.fit_figure(block)                    # geometry from the block's header
    assert len(fig.axes) == 8
    assert fig._suptitle is not None and "gal 0" in fig._suptitle.get_text()
    png_ok(fig)


def test_save_fit_figures(catalog_run):
    model, run = catalog_run
    paths = plot.save_fit_figures(model, run)
    assert [p.name for p in paths] == ["gal_0.png", "gal_1.png"]
    for p in paths:
        assert p.parent == run / "figures" and p.stat().st_size > 20_000
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 600
    # a galaxy that failed is skipped, not drawn
    table = Table.read(run / "results.fits")
    table["status"] = table["status"].astype("U32")
    table["status"][1] = "error: test"
    table.write(run / "results.fits", overwrite=True)
    assert [p.name for p in plot.save_fit_figures(model, run)] == ["gal_0.png"]


def test_save_fit_figures_draws_every_usable_fit(catalog_run, tmp_path):
    """Regression: a galaxy whose error estimate is flagged ("ok; errors: at prior bound ...")
    or whose inputs carry a note is a usable fit (galbayes sample draws it) and gets a figure;
    only failed galaxies are skipped."""
    import shutil

    from galbayes.sampling import sample_results
    from galbayes.status import NON_FINITE, fit_status, is_usable, with_notes

    model, run0 = catalog_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)        # the module's run stays as fitted
    table = Table.read(run / "results.fits")
    flagged = fit_status(True, "at prior bound: bulge_n")
    noted = with_notes("ok", ["sigma estimated from image (MAD of the background)"])
    assert flagged == "ok; errors: at prior bound: bulge_n" and noted.startswith("ok; sigma")
    table["status"] = table["status"].astype("U96")
    table["status"][1] = "ok"         # (test_save_fit_figures marks it failed in the module's run)
    for status in (flagged, noted):
        table["status"][0] = status
        table.write(run / "results.fits", overwrite=True)
        shutil.rmtree(run / "figures", ignore_errors=True)
        assert [p.name for p in plot.save_fit_figures(model, run)] == ["gal_0.png", "gal_1.png"], status
    # the figures are made for exactly the fits galbayes sample accepts
    table["status"][1] = NON_FINITE
    table.write(run / "results.fits", overwrite=True)
    shutil.rmtree(run / "figures")
    drawn = [p.stem for p in plot.save_fit_figures(model, run)]
    assert drawn == ["gal_0"]
    assert [str(s) for s in Table.read(run / "results.fits")["status"]] == [noted, NON_FINITE]
    assert [is_usable(s) for s in table["status"]] == [True, False]
    # galbayes sample draws the same ones: it refuses only the failed galaxy (before any NUTS)
    new, skipped = sample_results(run, ids=["gal 1"])
    assert len(new) == 0 and skipped == {"gal 1": f"its MAP fit failed ({NON_FINITE})"}


def test_read_block_rejects_other_files(tmp_path):
    path = tmp_path / "x.fits"
    fits.writeto(path, np.zeros((4, 4)))
    with pytest.raises(ValueError):
        plot.read_block(path)


def test_angle_columns_come_from_the_parameter_declarations():
    from galbayes import Component, Model
    from galbayes.plot import _is_angle

    model = Model([Component("bulge", "sersic"), Component("disk", "exponential")])
    angles = [k for k in model.keys if _is_angle(k, model)]
    assert angles == [e.key for e in model.entries if e.spec.angle] == ["bulge_pa", "disk_pa"]
    assert not _is_angle("pa", model)                  # not a column of this model
    assert [k for k in ("pa", "sersic_pa", "mag", "q", "spa", "pa_err") if _is_angle(k)] == ["pa", "sersic_pa"]

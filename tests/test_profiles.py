"""Built-in profiles: flux normalisation, pixel values against GalSim and independent numpy
references, point sources, skies and the geometric conventions (x = column, y = row, pa CCW
from +y, re along the major axis, q = b/a)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special

import galbayes as gb
from _helpers import flux_of, galsim_draw, render_single

MAG = 18.0
SMALL, LARGE = (32, 36), (72, 80)  # (ny, nx): non-square catches x/y swaps
F = flux_of(MAG)
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


# --------------------------------------------------------------------------- references
def fraction_in_stamp(cum, shape, xc, yc, pa, q, box=0.0):
    """Fraction of a profile's total flux inside the stamp [-½, nx-½] × [-½, ny-½].

    ``cum(R)`` is the fraction of the flux inside generalised-ellipse radius R (along the
    major axis). Along a ray at angle ψ from the centre the ellipse radius is ``s·k(ψ)``;
    the flux inside the stamp is ∫dψ ∫_0^{d(ψ)} I(s k) s ds = ∫dψ C(d k)/k² up to a constant,
    normalised by ∫dψ /k² (which is independent of the code's r_box factor).
    """
    ny, nx = shape
    th = math.radians(pa + 90.0)
    p = 2.0 + box

    def dist_to_edge(psi):
        c, s = math.cos(psi), math.sin(psi)
        ds = []
        if c > 1e-15:
            ds.append((nx - 0.5 - xc) / c)
        if c < -1e-15:
            ds.append((-0.5 - xc) / c)
        if s > 1e-15:
            ds.append((ny - 0.5 - yc) / s)
        if s < -1e-15:
            ds.append((-0.5 - yc) / s)
        return min(ds)

    def k(psi):
        dx, dy = math.cos(psi), math.sin(psi)
        xm = dx * math.cos(th) + dy * math.sin(th)
        ym = (-dx * math.sin(th) + dy * math.cos(th)) / q
        return (abs(xm) ** p + abs(ym) ** p) ** (1.0 / p)

    corners = sorted(math.atan2(cy - yc, cx - xc) % (2 * math.pi)
                     for cx in (-0.5, nx - 0.5) for cy in (-0.5, ny - 0.5))
    opts = dict(limit=400, epsabs=0.0, epsrel=1e-10)
    num = integrate.quad(lambda s: cum(dist_to_edge(s) * k(s)) / k(s) ** 2, 0, 2 * math.pi, points=corners, **opts)[0]
    den = integrate.quad(lambda s: 1.0 / k(s) ** 2, 0, 2 * math.pi, **opts)[0]
    return num / den


def _numeric_cum(shape_fn, rmax):
    opts = dict(limit=400, epsabs=0.0, epsrel=1e-11)
    total = integrate.quad(lambda r: shape_fn(r) * r, 0, rmax, **opts)[0]
    return lambda R: integrate.quad(lambda r: shape_fn(r) * r, 0, min(R, rmax), **opts)[0] / total


def ferrer_shape(rout, alpha, beta):
    return lambda r: (1.0 - (r / rout) ** (2.0 - beta)) ** alpha if r < rout else 0.0


def king_shape(rc, rt, alpha):
    """Paper eq. 11 (Elson's empirical King), up to the constant I0."""
    ut = (1.0 + (rt / rc) ** 2) ** (-1.0 / alpha)
    return lambda r: ((1.0 + (r / rc) ** 2) ** (-1.0 / alpha) - ut) ** alpha if r < rt else 0.0


def cumulative(profile, p):
    """Enclosed-flux fraction C(R) of each profile, from closed forms or scipy quadrature."""
    if profile == "sersic":
        n, re = p["n"], p["re"]
        nu = special.gammaincinv(2 * n, 0.5)
        return lambda R: special.gammainc(2 * n, nu * (R / re) ** (1.0 / n))
    if profile == "exponential":
        return lambda R: special.gammainc(2.0, R / p["rs"])
    if profile == "gaussian":
        sig = p["fwhm"] * FWHM_TO_SIGMA
        return lambda R: -math.expm1(-0.5 * (R / sig) ** 2)
    if profile == "moffat":
        b = p["beta"]
        rd = p["fwhm"] / (2.0 * math.sqrt(2.0 ** (1.0 / b) - 1.0))
        return lambda R: 1.0 - (1.0 + (R / rd) ** 2) ** (1.0 - b)
    if profile == "ferrer":
        return _numeric_cum(ferrer_shape(p["rout"], p["alpha"], p["beta"]), p["rout"])
    if profile == "king":
        return _numeric_cum(king_shape(p["rc"], p["rt"], p["alpha"]), p["rt"])
    raise AssertionError(profile)


def gaussian_psf(size, sigma):
    y, x = np.mgrid[:size[0], :size[1]]
    cy, cx = (size[0] - 1) // 2, (size[1] - 1) // 2
    return np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / sigma**2)


# --------------------------------------------------------------------------- flux table
# (profile, shape parameters, stamp size). Centres are sub-pixel, pa = 25°.
FLUX_CASES = [
    ("sersic", dict(n=0.5, re=4.0, q=1.0, box=0.0), 41),
    ("sersic", dict(n=0.5, re=3.0, q=0.2, box=0.0), 41),
    ("sersic", dict(n=1.0, re=4.0, q=0.2, box=0.0), 61),
    ("sersic", dict(n=1.0, re=3.0, q=0.7, box=0.8), 61),
    ("sersic", dict(n=2.0, re=4.0, q=0.5, box=0.5), 101),
    ("sersic", dict(n=4.0, re=3.0, q=0.7, box=-0.3), 101),
    ("sersic", dict(n=4.0, re=1.0, q=0.2, box=0.0), 101),
    ("sersic", dict(n=6.0, re=3.0, q=0.2, box=0.0), 101),
    ("sersic", dict(n=6.0, re=0.8, q=0.9, box=0.0), 101),
    ("sersic", dict(n=8.0, re=3.0, q=0.6, box=0.0), 101),
    ("sersic", dict(n=8.0, re=1.5, q=1.0, box=0.8), 101),
    ("exponential", dict(rs=3.0, q=0.3, box=0.0), 61),
    ("exponential", dict(rs=2.0, q=0.8, box=0.7), 61),
    ("gaussian", dict(fwhm=3.0, q=0.2, box=0.0), 41),
    ("gaussian", dict(fwhm=1.5, q=0.6, box=-0.4), 41),
    ("moffat", dict(fwhm=3.0, beta=3.0, q=0.5, box=0.0), 61),
    ("moffat", dict(fwhm=2.0, beta=1.8, q=0.8, box=0.4), 61),
    ("ferrer", dict(rout=10.0, alpha=2.0, beta=0.0, q=0.4, box=0.0), 41),
    ("ferrer", dict(rout=8.0, alpha=0.5, beta=1.0, q=0.7, box=0.6), 41),
    ("ferrer", dict(rout=3.0, alpha=1.5, beta=-0.5, q=0.2, box=0.0), 41),
    ("king", dict(rc=2.0, rt=12.0, alpha=2.0, q=0.5, box=0.0), 41),
    ("king", dict(rc=1.0, rt=20.0, alpha=1.2, q=0.9, box=0.5), 61),
    ("king", dict(rc=3.0, rt=8.0, alpha=3.0, q=0.2, box=0.0), 41),
]


def _case_id(case):
    name, p, size = case
    return name + "-" + "-".join(f"{k}{v:g}" for k, v in p.items()) + f"-{size}px"


@pytest.mark.parametrize("case", FLUX_CASES, ids=_case_id)
def test_flux_of_centred_profiles(case):
    """Σ pixels = F × (analytic fraction of the flux inside the stamp), within 0.5%.

    The stamps hold ≥ 95% of the flux (all of it for most cases); the expected fraction
    is computed independently with scipy (closed-form enclosed flux or quadrature)."""
    name, shape_p, size = case
    shape = (size, size + 2)
    xc, yc, pa = (shape[1] - 1) / 2 - 0.27, (shape[0] - 1) / 2 + 0.33, 25.0
    img = render_single(name, dict(xc=xc, yc=yc, pa=pa, mag=MAG, **shape_p), shape)
    frac = fraction_in_stamp(cumulative(name, shape_p), shape, xc, yc, pa, shape_p["q"], shape_p["box"])
    assert frac > 0.95
    assert np.all(np.isfinite(img))
    # Non-negative up to float32 FFT noise; the triangle-fan quadrature of the central 3×3
    # pixels can undershoot slightly next to a truncation edge (-0.12% of the peak for the
    # ferrer rout=3, q=0.2 case), hence 0.2% of the peak.
    assert img.min() >= -2e-3 * img.max()
    assert img.sum() == pytest.approx(F * frac, rel=5e-3)


def test_flux_table_covers_every_builtin_profile():
    covered = {c[0] for c in FLUX_CASES} | {"sky", "tilted_sky", "point"}
    assert covered == set(gb.available_profiles())


@pytest.mark.parametrize("zp, mag", [(22.5, 18.0), (27.0, 24.3), (0.0, -2.0)])
def test_magnitude_zero_point(zp, mag):
    shape = (41, 43)
    img = render_single("gaussian", dict(xc=20.0, yc=20.0, pa=0.0, q=1.0, fwhm=3.0, mag=mag), shape, zp=zp)
    assert img.sum() == pytest.approx(10.0 ** (-0.4 * (mag - zp)), rel=1e-3)


def test_point_source_flux_and_centroid():
    shape = SMALL
    psf = gaussian_psf((15, 15), 1.3)
    xc, yc = 17.3, 14.65
    img = render_single("point", dict(xc=xc, yc=yc, mag=MAG), shape, psf=psf)
    assert img.sum() == pytest.approx(F, rel=1e-4)
    y, x = np.mgrid[:shape[0], :shape[1]]
    assert (img * x).sum() / img.sum() == pytest.approx(xc, abs=2e-3)
    assert (img * y).sum() / img.sum() == pytest.approx(yc, abs=2e-3)


def test_point_source_on_a_pixel_is_the_shifted_psf():
    shape = SMALL
    psf = gaussian_psf((11, 13), 1.5) * (1 + 0.3 * np.random.default_rng(3).random((11, 13)))
    xc, yc = 20, 9
    img = render_single("point", dict(xc=xc, yc=yc, mag=MAG), shape, psf=psf)
    expected = np.zeros(shape)
    cy, cx = (psf.shape[0] - 1) // 2, (psf.shape[1] - 1) // 2
    expected[yc - cy:yc - cy + psf.shape[0], xc - cx:xc - cx + psf.shape[1]] = F * psf / psf.sum()
    np.testing.assert_allclose(img, expected, atol=2e-6 * expected.max())


def test_flat_sky():
    shape = (12, 17)
    img = render_single("sky", dict(sky=3.25), shape, psf=gaussian_psf((7, 7), 1.0))
    np.testing.assert_array_equal(img, np.full(shape, 3.25, np.float32))


def test_tilted_sky_is_a_plane_about_the_image_centre():
    """Exact plane values, including the edges: the sky is not PSF-convolved."""
    shape = (12, 17)
    sky, gx, gy = 2.5, 0.125, -0.0625
    img = render_single("tilted_sky", dict(sky=sky, dsky_dx=gx, dsky_dy=gy), shape, psf=gaussian_psf((9, 9), 1.5))
    y, x = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    expected = sky + gx * (x - (shape[1] - 1) / 2) + gy * (y - (shape[0] - 1) / 2)
    np.testing.assert_allclose(img, expected, rtol=0, atol=1e-6)
    assert img.sum() == pytest.approx(sky * img.size, rel=1e-6)


# --------------------------------------------------------------------------- vs GalSim
# Sub-pixel centre offsets from the stamp centre: a pixel centre, a pixel corner, generic.
OFFSETS = [(0.5, 0.5), (0.0, 0.0), (0.3, -0.35)]


def _centre(shape, off):
    return (shape[1] - 1) / 2 + off[0], (shape[0] - 1) / 2 + off[1]


SERSIC_GALSIM = [(n, re, shape, q, pa, off)
                 for n in (0.5, 1.0, 4.0, 6.0)
                 for (re, shape, q, pa) in ((2.0, SMALL, 0.7, 30.0), (15.0, LARGE, 0.5, -50.0))
                 for off in OFFSETS]


def _max_dev(a, b):
    return np.abs(a - b).max() / b.max()


@pytest.mark.parametrize("n, re, shape, q, pa, off", SERSIC_GALSIM)
def test_sersic_matches_galsim(n, re, shape, q, pa, off):
    galsim = pytest.importorskip("galsim")
    xc, yc = _centre(shape, off)
    ours = render_single("sersic", dict(xc=xc, yc=yc, pa=pa, q=q, re=re, n=n, mag=MAG), shape)
    obj = galsim.Sersic(n, half_light_radius=re * math.sqrt(q), flux=F).shear(q=q, beta=(pa + 90.0) * galsim.degrees)
    # Pixel-integrated by real-space convolution with the pixel (same quantity as
    # method='auto'; GalSim's FFT for n >= 4 would need multi-GB grids).
    ref = galsim_draw(obj, shape, xc, yc, real_space=True)
    assert _max_dev(ours, ref) < 0.01
    if n <= 1.0:  # cheap for GalSim's FFT drawing: check method='auto' too
        assert _max_dev(ours, galsim_draw(obj, shape, xc, yc)) < 0.01


@pytest.mark.parametrize("pa", [0.0, 90.0, 30.0, -60.0])
def test_elongated_sersic_orientation_matches_galsim(pa):
    galsim = pytest.importorskip("galsim")
    shape = (41, 43)
    xc, yc = 21.7, 19.2
    q, re, n = 0.15, 8.0, 1.5
    ours = render_single("sersic", dict(xc=xc, yc=yc, pa=pa, q=q, re=re, n=n, mag=MAG), shape)
    obj = galsim.Sersic(n, half_light_radius=re * math.sqrt(q), flux=F).shear(q=q, beta=(pa + 90.0) * galsim.degrees)
    ref = galsim_draw(obj, shape, xc, yc, real_space=True)
    assert _max_dev(ours, ref) < 0.01
    # ... and the wrong orientation (pa + 90°) is very different, so the check is sharp.
    wrong = galsim_draw(obj.rotate(90.0 * galsim.degrees), shape, xc, yc, real_space=True)
    assert _max_dev(ours, wrong) > 0.3


OTHER_GALSIM = [
    ("exponential", dict(rs=1.5), 1.0, 0.0),
    ("exponential", dict(rs=6.0), 0.4, -70.0),
    ("gaussian", dict(fwhm=1.5), 1.0, 0.0),
    ("gaussian", dict(fwhm=6.0), 0.4, -70.0),
    ("moffat", dict(fwhm=2.0, beta=3.0), 1.0, 0.0),
    ("moffat", dict(fwhm=5.0, beta=1.5), 0.4, -70.0),
    ("moffat", dict(fwhm=3.0, beta=4.5), 0.25, 40.0),
]


def _galsim_object(galsim, name, p, q):
    s = math.sqrt(q)  # GalSim's shear conserves area: major-axis size = size·/√q
    if name == "exponential":
        return galsim.Exponential(scale_radius=p["rs"] * s, flux=F)
    if name == "gaussian":
        return galsim.Gaussian(fwhm=p["fwhm"] * s, flux=F)
    if name == "moffat":
        return galsim.Moffat(p["beta"], fwhm=p["fwhm"] * s, flux=F)
    raise AssertionError(name)


@pytest.mark.parametrize("name, p, q, pa", OTHER_GALSIM, ids=lambda v: str(v))
def test_other_profiles_match_galsim(name, p, q, pa):
    galsim = pytest.importorskip("galsim")
    shape = SMALL
    xc, yc = _centre(shape, (0.3, -0.35))
    ours = render_single(name, dict(xc=xc, yc=yc, pa=pa, q=q, mag=MAG, **p), shape)
    obj = _galsim_object(galsim, name, p, q).shear(q=q, beta=(pa + 90.0) * galsim.degrees)
    assert _max_dev(ours, galsim_draw(obj, shape, xc, yc)) < 0.01
    assert _max_dev(ours, galsim_draw(obj, shape, xc, yc, real_space=True)) < 0.01


# --------------------------------------------------------------------------- ferrer, king
def _brute_force(shape_fn, shape, xc, yc, pa, q, sub=16):
    """Pixel means of ``shape(r)`` (elliptical, B = 0) by sub×sub midpoint sampling."""
    th = math.radians(pa + 90.0)
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    y = (np.arange(shape[0])[:, None] + offs[None, :]).ravel()
    x = (np.arange(shape[1])[:, None] + offs[None, :]).ravel()
    yy, xx = np.meshgrid(y, x, indexing="ij")
    dx, dy = xx - xc, yy - yc
    xm = dx * math.cos(th) + dy * math.sin(th)
    ym = (-dx * math.sin(th) + dy * math.cos(th)) / q
    r = np.hypot(xm, ym)
    vals = np.vectorize(shape_fn)(r)
    return vals.reshape(shape[0], sub, shape[1], sub).mean(axis=(1, 3))


@pytest.mark.parametrize("name, p", [
    ("ferrer", dict(rout=9.0, alpha=2.0, beta=0.5)),
    ("ferrer", dict(rout=6.0, alpha=1.0, beta=-0.5)),
    ("king", dict(rc=1.5, rt=10.0, alpha=2.0)),
    ("king", dict(rc=3.0, rt=9.0, alpha=1.3)),
])
def test_ferrer_and_king_match_numpy_reference(name, p):
    shape, pa, q = (41, 43), 35.0, 0.6
    xc, yc = 21.2, 19.7
    ours = render_single(name, dict(xc=xc, yc=yc, pa=pa, q=q, mag=MAG, **p), shape)
    if name == "ferrer":
        fn, rmax = ferrer_shape(p["rout"], p["alpha"], p["beta"]), p["rout"]
    else:
        fn, rmax = king_shape(p["rc"], p["rt"], p["alpha"]), p["rt"]
    # total flux of I0·shape over the plane = 2π q I0 ∫ shape(r) r dr
    radial = integrate.quad(lambda r: fn(r) * r, 0, rmax, limit=400, epsabs=0, epsrel=1e-11)[0]
    i0 = F / (2 * math.pi * q * radial)
    ref = i0 * _brute_force(fn, shape, xc, yc, pa, q)
    assert _max_dev(ours, ref) < 0.01


# --------------------------------------------------------------------------- conventions
def _moments(img):
    y, x = np.mgrid[:img.shape[0], :img.shape[1]].astype(np.float64)
    f = img.sum()
    mx, my = (img * x).sum() / f, (img * y).sum() / f
    mxx = (img * (x - mx) ** 2).sum() / f
    myy = (img * (y - my) ** 2).sum() / f
    mxy = (img * (x - mx) * (y - my)).sum() / f
    return mx, my, mxx, myy, mxy


@pytest.mark.parametrize("pa", [0.0, 90.0, 45.0, -45.0, 20.0, -70.0])
def test_position_angle_convention(pa):
    """pa is CCW from +y (rows): pa = 0 puts the major axis along y, pa = 90 along x, and
    the moment position angle atan2(2Mxy, Mxx − Myy)/2 equals pa + 90° (from +x)."""
    shape = (41, 43)
    img = render_single("gaussian", dict(xc=23.4, yc=21.8, pa=pa, q=0.3, fwhm=8.0, mag=MAG), shape)
    mx, my, mxx, myy, mxy = _moments(img)
    assert mx == pytest.approx(23.4, abs=1e-3)
    assert my == pytest.approx(21.8, abs=1e-3)
    theta = math.degrees(0.5 * math.atan2(2 * mxy, mxx - myy))
    assert ((theta - (pa + 90.0) + 90.0) % 180.0) - 90.0 == pytest.approx(0.0, abs=0.1)
    if pa == 0.0:
        assert myy > 5 * mxx and abs(mxy) < 1e-3 * myy
    if pa == 90.0:
        assert mxx > 5 * myy and abs(mxy) < 1e-3 * mxx
    if pa == 45.0:  # θ = 135°: the major axis runs towards −x as y grows
        assert mxy < 0


def test_major_axis_sizes_and_axis_ratio():
    """Second moments of a Gaussian: σ_major² = (fwhm/2.355)², σ_minor² = q² σ_major²
    (pixel integration adds 1/12 per axis)."""
    shape = (61, 63)
    fwhm, q = 10.0, 0.4
    img = render_single("gaussian", dict(xc=30.0, yc=30.0, pa=0.0, q=q, fwhm=fwhm, mag=MAG), shape)
    _, _, mxx, myy, _ = _moments(img)
    sig = fwhm * FWHM_TO_SIGMA
    assert myy == pytest.approx(sig**2 + 1 / 12, rel=2e-3)
    assert mxx == pytest.approx((q * sig) ** 2 + 1 / 12, rel=2e-3)


def test_centre_is_column_row():
    """xc is a column index, yc a row index (0-based pixel centres)."""
    img = render_single("gaussian", dict(xc=5.0, yc=11.0, pa=0.0, q=1.0, fwhm=1.5, mag=MAG), SMALL)
    assert np.unravel_index(np.argmax(img), img.shape) == (11, 5)


def test_boxy_isophotes():
    """box > 0 is boxy (more light along the diagonals of the major/minor frame than an
    ellipse of equal flux at the same radius), box < 0 discy."""
    shape = (41, 43)
    c = 20.0
    base = dict(xc=c, yc=c, pa=0.0, q=1.0, rs=5.0, mag=MAG)
    boxy = render_single("exponential", dict(base, box=1.0), shape)
    disky = render_single("exponential", dict(base, box=-0.5), shape)
    ell = render_single("exponential", dict(base, box=0.0), shape)
    # Pixels at distance 8 along an axis and along the diagonal.
    axis, diag = (20, 28), (26, 26)  # (row, col); the centre is (20, 20)
    assert boxy[diag] / boxy[axis] > ell[diag] / ell[axis] > disky[diag] / disky[axis]
    # the generalised radius: along the diagonal r = (2·6^(2+B))^(1/(2+B)) for B = 1
    r_diag = (2 * 6.0**3) ** (1 / 3)
    assert boxy[diag] / boxy[axis] == pytest.approx(math.exp(-(r_diag - 8.0) / 5.0), rel=5e-3)


def test_pixel_average_is_exact_for_cubics_and_replicates_edges():
    """``f + ∇²f/24`` is the exact pixel mean of a cubic polynomial (the mean of x³ over a
    pixel is x³ + x/4, of x²y it is (x² + 1/12) y); at the border the missing neighbour is the
    edge pixel itself. Leading batch axes, jvp and vjp as the fitters use it."""
    import jax
    import jax.numpy as jnp

    from galbayes.geometry import pixel_average

    y, x = np.mgrid[:11, :13].astype(np.float64)
    x, y = (x - 6.0) / 6.0, (y - 5.0) / 5.0       # O(1) values: float32 rounding stays small

    def f(x, y):
        return 1.0 + 0.3 * x - 0.7 * y + 0.5 * x**2 - 0.2 * x * y + x**3 - 0.4 * x**2 * y + 0.6 * y**3

    # exact means over [x ± 1/12, y ± 1/10] (a pixel in these scaled units), by Gauss-Legendre
    u, w = np.polynomial.legendre.leggauss(4)
    exact = sum(wi * wj * f(x + ui / 12.0, y + uj / 10.0) for ui, wi in zip(u, w) for uj, wj in zip(u, w)) / 4
    samples = f(x, y)
    # the stencil acts in pixel units: scale the exact correction the same way
    got = np.asarray(pixel_average(jnp.asarray(samples, jnp.float32)))
    sx, sy = 1 / 6.0, 1 / 5.0
    lap = ((6 * x + 1.0 - 0.8 * y) * sx**2 + (3.6 * y) * sy**2)   # ∇²f in pixel units
    np.testing.assert_allclose(exact, samples + lap / 24.0, atol=1e-12)
    np.testing.assert_allclose(got[1:-1, 1:-1], exact[1:-1, 1:-1], atol=2e-6)

    def edge_stencil(a):       # numpy: neighbours from an edge-replicated copy
        p = np.pad(a, 1, mode="edge")
        return a + (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * a) / 24.0

    np.testing.assert_allclose(got, edge_stencil(samples), atol=2e-6)

    batch = np.stack([samples, 2 * samples - 1, samples**2])
    out = np.asarray(pixel_average(jnp.asarray(batch, jnp.float32)))
    vm = np.asarray(jax.vmap(pixel_average)(jnp.asarray(batch, jnp.float32)))
    for k in range(3):
        np.testing.assert_allclose(out[k], edge_stencil(batch[k]), atol=1e-5)
        np.testing.assert_allclose(vm[k], edge_stencil(batch[k]), atol=1e-5)

    # linear: the jvp is the map itself, the vjp its transpose (<Av, w> = <v, Aᵀw>)
    rng = np.random.default_rng(0)
    v, wt = (jnp.asarray(rng.normal(size=samples.shape), jnp.float32) for _ in range(2))
    _, tangent = jax.jvp(pixel_average, (v,), (v,))
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(pixel_average(v)), atol=1e-6)
    (cot,) = jax.vjp(pixel_average, v)[1](wt)
    assert abs(float(jnp.vdot(pixel_average(v), wt)) - float(jnp.vdot(v, cot))) < 1e-3

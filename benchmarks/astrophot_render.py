"""AstroPhot model images of Sérsic ⊛ PSF at given (true) parameters, for bench_fidelity.py.

AstroPhot needs torch, which is not in galbayes' environment, so this script runs in its own
virtualenv and talks to the benchmark through .npz files::

    /work/venv-ap/bin/python benchmarks/astrophot_render.py IN.npz OUT.npz
    /work/venv-ap/bin/python benchmarks/astrophot_render.py --selfcheck
    /work/venv-ap/bin/python benchmarks/astrophot_render.py --time     # 64 × 128², 41² PSF

IN.npz: ``truth`` (N, 7) float64, columns xc, yc, pa, q, re, n, mag (galbayes conventions);
``psf`` 2-D, unit sum, odd or even size; ``shape`` (ny, nx); ``zp``.
OUT.npz: ``model`` (N, ny, nx) float64 in the input flux units, ``version`` (AstroPhot's),
``settings`` (the sampling / integration / convolution settings used).

Conventions converted to AstroPhot's (checked by ``--selfcheck``):

* Image: ``TargetImage(pixelscale=1)`` with AstroPhot's default ``crpix = crtan = (0, 0)`` and
  CD = identity, so its tangent-plane coordinates are the 0-based pixel coordinates, x = column,
  y = row, pixel centres at integers: ``center = [xc, yc]`` unchanged. Pixel area is 1, so
  AstroPhot's flux/arcsec² is flux/pixel.
* Position angle: AstroPhot rotates by ``π/2 − PA`` and divides y' by q, so with an identity
  CD its major axis points along (−sin PA, cos PA), i.e. PA counter-clockwise from +y as in
  galbayes; only degrees → radians (mod π) is needed.
* ``Re``, ``q``, ``n`` as given. ``Ie = F / (2π re² q n e^{b} b^{-2n} Γ(2n))`` with the exact
  b = P⁻¹(2n, ½) (galbayes' definition of the truth); AstroPhot evaluates the profile with its
  own Ciotti–Bertin polynomial b_n (relative error 3.6e-4 at n = 0.5, 2.5e-5 at n = 1, < 2e-6
  for n ≥ 2), so at low n its profile differs from the truth by that much (part of its model
  error, as for Imfit).
* PSF: ``PSFImage(data=psf)`` (upsample 1). AstroPhot wants odd sizes and puts the centre
  pixel on the source; galbayes (and ``scipy.signal.fftconvolve(mode="same")``) puts pixel
  ``(k−1)//2`` on the source, so an even axis gets one zero row/column in front — exact, no
  resampling. A 1×1 PSF means no convolution in both.

Everything else is AstroPhot's default: ``sampling_mode="auto"`` (chosen from the window size:
≤ 100 px ``quad:5``, ≤ 10 000 px ``simpsons``, else ``midpoint``), ``integrate_mode="bright"``
(the brightest 5 % of the padded canvas re-integrated with 3×3 Gauss quadrature, the
brightest 5 % of those again on a 5×5 sub-grid, depth 2), ``psf_convolve=True`` (FFT
convolution of the sampled canvas padded by the PSF half-size, then cropped). The profile is
pixel-integrated and then convolved with the PSF as given, i.e. an effective PSF's pixel
response is applied a second time (as with Imfit); that is AstroPhot's default treatment.

torch runs on one thread by default (``--threads``) to keep CPU use modest.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

# AstroPhot's config calls logging.basicConfig(filename="AstroPhot.log") at import, which would
# leave a log file in the working directory; a handler on the root logger makes that a no-op.
logging.getLogger().addHandler(logging.NullHandler())

import numpy as np  # noqa: E402
from scipy import special  # noqa: E402

COLUMNS = ("xc", "yc", "pa", "q", "re", "n", "mag")


# --------------------------------------------------------------------------- conversions
def sersic_bn(n):
    """The exact b_n: Γ(2n) P(2n, b_n) = Γ(2n)/2."""
    return special.gammaincinv(2.0 * np.asarray(n, float), 0.5)


def sersic_flux_norm(n, re, q):
    """Total flux / I_e of an elliptical Sérsic (I_e at the major-axis r_e), exact b_n."""
    b = sersic_bn(n)
    return 2.0 * np.pi * q * re**2 * n * special.gamma(2.0 * n) * np.exp(b) / b ** (2.0 * n)


def astrophot_params(row, zp):
    """galbayes (xc, yc, pa[deg], q, re, n, mag) → AstroPhot SersicGalaxy parameter values."""
    xc, yc, pa, q, re, n, mag = (float(v) for v in row)
    flux = 10.0 ** (-0.4 * (mag - zp))
    return {"center": [xc, yc], "PA": float(np.deg2rad(pa) % np.pi), "q": q, "Re": re, "n": n,
            "Ie": float(flux / sersic_flux_norm(n, re, q))}


def odd_psf(psf):
    """Pad even axes with one zero row/column in front so that galbayes' centre pixel
    ``(k−1)//2`` becomes the centre of an odd array (AstroPhot's convention)."""
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2:
        raise ValueError(f"psf must be 2-D, got shape {psf.shape}")
    pad = [(1 - k % 2, 0) for k in psf.shape]
    return np.pad(psf, pad) if any(p for p, _ in pad) else psf


# --------------------------------------------------------------------------- rendering
class Renderer:
    """One AstroPhot Sérsic model on one target; parameters are set, never fitted."""

    def __init__(self, shape, psf, zp):
        import astrophot as ap

        self.ap = ap
        ny, nx = (int(s) for s in shape)
        self.psf = ap.PSFImage(data=odd_psf(psf))
        self.target = ap.TargetImage(data=np.zeros((ny, nx)), pixelscale=1.0, zeropoint=float(zp),
                                     psf=self.psf)
        self.zp = float(zp)
        self.model = None

    def _build(self, p):
        # sampling_mode / integrate_mode / psf_convolve left at AstroPhot's defaults.
        self.model = self.ap.Model(name="sersic", model_type="sersic galaxy model",
                                   target=self.target, **p)

    def render(self, row):
        p = astrophot_params(row, self.zp)
        if self.model is None:
            self._build(p)
        else:
            for k, v in p.items():
                getattr(self.model, k).value = v
        return self.model().data.detach().cpu().numpy().astype(np.float64)

    def settings(self):
        m = self.model
        k = tuple(int(s) for s in self.psf.data.shape)
        return (f"sampling_mode=auto->{m.sampling_mode}; integrate_mode={m.integrate_mode} "
                f"(fraction {m.integrate_fraction}, max_depth {m.integrate_max_depth}, gridding "
                f"{m.integrate_gridding}, quad_order {m.integrate_quad_order}); psf_convolve="
                f"{m.psf_convolve} (FFT, canvas pad {self.psf.pad}, PSFImage {k[0]}x{k[1]}, "
                f"upsample {self.psf.upsample}); softening {m.softening}; Ie from exact b_n")


def render_all(truth, psf, shape, zp):
    """(N, ny, nx) AstroPhot model images and the settings string."""
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 7)
    r = Renderer(shape, psf, zp)
    out = np.empty((len(truth), int(shape[0]), int(shape[1])), dtype=np.float64)
    for i, row in enumerate(truth):
        out[i] = r.render(row)
    return out, r.settings() if r.model is not None else "no galaxies"


def astrophot_version():
    import astrophot as ap

    return str(ap.__version__)


# --------------------------------------------------------------------------- self-check
def brute_force(row, shape, zp, sub=15):
    """galbayes-convention Sérsic averaged over sub × sub points in every pixel (numpy)."""
    xc, yc, pa, q, re, n, mag = (float(v) for v in row)
    ie = 10.0 ** (-0.4 * (mag - zp)) / sersic_flux_norm(n, re, q)
    b = sersic_bn(n)
    ny, nx = shape
    off = (np.arange(sub) + 0.5) / sub - 0.5
    y = (np.arange(ny)[:, None] + off[None, :]).reshape(-1)
    x = (np.arange(nx)[:, None] + off[None, :]).reshape(-1)
    dy, dx = y[:, None] - yc, x[None, :] - xc
    t = np.deg2rad(pa) + np.pi / 2  # major axis from +x
    a = dx * np.cos(t) + dy * np.sin(t)
    c = -dx * np.sin(t) + dy * np.cos(t)
    r = np.sqrt(a**2 + (c / q) ** 2)
    img = ie * np.exp(-b * ((r / re) ** (1.0 / n) - 1.0))
    return img.reshape(ny, sub, nx, sub).mean(axis=(1, 3))


def moments(img):
    """Flux-weighted centroid (x, y) and second-moment major-axis pa (deg CCW from +y)."""
    ny, nx = img.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    f = img.sum()
    cx, cy = (img * x).sum() / f, (img * y).sum() / f
    mxx = (img * (x - cx) ** 2).sum() / f
    myy = (img * (y - cy) ** 2).sum() / f
    mxy = (img * (x - cx) * (y - cy)).sum() / f
    theta = 0.5 * np.degrees(np.arctan2(2 * mxy, mxx - myy))  # from +x
    return cx, cy, theta % 180.0 - 90.0  # pa = theta - 90, wrapped to [-90, 90)


def selfcheck():
    shape, zp = (80, 80), 25.0
    row = np.array([40.3, 35.7, 30.0, 0.4, 8.0, 1.0, 17.0])
    flux = 10.0 ** (-0.4 * (row[6] - zp))
    delta = np.ones((1, 1))
    ok = True

    def check(name, value, tol, fmt="{:.3g}"):
        nonlocal ok
        good = bool(abs(value) <= tol)
        ok &= good
        print(f"  {'PASS' if good else 'FAIL'}  {name}: {fmt.format(value)} (tolerance {tol:g})")

    r1 = Renderer(shape, delta, zp)
    ap_img = r1.render(row)
    bf = brute_force(row, shape, zp)
    print(f"AstroPhot {astrophot_version()}; settings: {r1.settings()}")
    print(f"galaxy xc={row[0]} yc={row[1]} pa={row[2]} q={row[3]} re={row[4]} n={row[5]} "
          f"on {shape[0]}x{shape[1]}, delta (1x1) PSF; brute force = mean of 15x15 sub-pixel points")

    pk_ap = np.unravel_index(np.argmax(ap_img), shape)
    pk_bf = np.unravel_index(np.argmax(bf), shape)
    print(f"  peak pixel (row, col): AstroPhot {tuple(map(int, pk_ap))}, brute force "
          f"{tuple(map(int, pk_bf))}")
    check("peak pixel offset (pixels)", 0 if pk_ap == pk_bf else 1, 0, "{:d}")

    cxa, cya, paa = moments(ap_img)
    cxb, cyb, pab = moments(bf)
    print(f"  centroid: AstroPhot ({cxa:.4f}, {cya:.4f}), brute force ({cxb:.4f}, {cyb:.4f}), "
          f"truth ({row[0]}, {row[1]})")
    check("centroid distance AstroPhot - brute force (px)", np.hypot(cxa - cxb, cya - cyb), 0.02,
          "{:.5f}")
    print(f"  second-moment pa: AstroPhot {paa:.3f} deg, brute force {pab:.3f} deg, truth {row[2]}")
    check("orientation difference (deg)", (paa - pab + 90) % 180 - 90, 0.5, "{:.4f}")
    fa, fb = ap_img.sum(), bf.sum()
    print(f"  flux in stamp: AstroPhot {fa:.3f}, brute force {fb:.3f}; total (infinite plane) "
          f"{flux:.3f}, so {fb / flux:.5f} of it falls in the stamp")
    check("in-stamp flux ratio AstroPhot / brute force - 1", fa / fb - 1, 0.01, "{:.2e}")
    rel = np.abs(ap_img - bf).max() / bf.max()
    print(f"  max |AstroPhot - brute force| / peak = {rel:.2e} (information)")

    # The benchmark's 128x128 stamps get sampling_mode auto -> midpoint: same checks there.
    big, brow = (128, 128), row + np.array([24.0, 24.0, 0, 0, 0, 0, 0])
    rb = Renderer(big, delta, zp)
    ap_b, bf_b = rb.render(brow), brute_force(brow, big, zp)
    cxa, cya, paa = moments(ap_b)
    cxb, cyb, pab = moments(bf_b)
    print(f"same galaxy at ({brow[0]}, {brow[1]}) on 128x128 ({rb.settings().split(';')[0]}):")
    check("peak pixel offset (pixels)",
          0 if np.argmax(ap_b) == np.argmax(bf_b) else 1, 0, "{:d}")
    check("centroid distance AstroPhot - brute force (px)", np.hypot(cxa - cxb, cya - cyb), 0.02,
          "{:.5f}")
    check("orientation difference (deg)", (paa - pab + 90) % 180 - 90, 0.5, "{:.4f}")
    check("in-stamp flux ratio AstroPhot / brute force - 1", ap_b.sum() / bf_b.sum() - 1, 0.01,
          "{:.2e}")
    print(f"  max |AstroPhot - brute force| / peak = "
          f"{np.abs(ap_b - bf_b).max() / bf_b.max():.2e} (information)")

    # PSF path: alignment and orientation of the convolution (delta PSFs of other shapes).
    print("PSF path (max |difference| / peak, interior pixels):")
    peak = ap_img.max()

    def psf_case(name, psf, expect, tol=2e-3):
        img = Renderer(shape, psf, zp).render(row)
        check(name, np.abs(img - expect)[2:-2, 2:-2].max() / peak, tol, "{:.2e}")
        return img

    d3 = np.zeros((3, 3)); d3[1, 1] = 1
    psf_case("3x3 centred delta == 1x1", d3, ap_img)
    d2 = np.zeros((2, 2)); d2[0, 0] = 1  # galbayes' centre of an even PSF: (k-1)//2 = 0
    psf_case("2x2 delta at its (k-1)//2 pixel == 1x1", d2, ap_img)
    sx = np.zeros((3, 3)); sx[1, 2] = 1  # light moves to +x (next column)
    psf_case("3x3 delta at [1,2] shifts by +1 column", sx, np.roll(ap_img, 1, axis=1))
    sy = np.zeros((3, 3)); sy[2, 1] = 1  # light moves to +y (next row)
    psf_case("3x3 delta at [2,1] shifts by +1 row", sy, np.roll(ap_img, 1, axis=0))
    s4 = np.zeros((4, 4)); s4[1, 2] = 1  # even: centre (1,1); +1 column
    psf_case("4x4 delta at [1,2] shifts by +1 column", s4, np.roll(ap_img, 1, axis=1))

    # One model re-used for several galaxies must equal fresh models.
    rows = np.array([[30.2, 44.9, -20.0, 0.7, 3.0, 3.0, 18.0], [45.0, 41.0, 100.0, 0.9, 5.0, 0.6, 19.0]])
    g = np.zeros((5, 5)); g[2, 2] = 0.5; g[1, 2] = g[3, 2] = g[2, 1] = g[2, 3] = 0.125
    batch, _ = render_all(rows, g, shape, zp)
    fresh = np.stack([Renderer(shape, g, zp).render(rw) for rw in rows])
    check("re-used model == fresh model (max |diff| / peak)",
          np.abs(batch - fresh).max() / fresh.max(), 1e-12, "{:.1e}")

    print("SELF-CHECK PASSED" if ok else "SELF-CHECK FAILED")
    return 0 if ok else 1


def timing(count=64, size=128, psf_size=41, seed=1):
    rng = np.random.default_rng(seed)
    c = (size - 1) / 2.0
    truth = np.column_stack([c + rng.uniform(-1, 1, count), c + rng.uniform(-1, 1, count),
                             rng.uniform(-90, 90, count), rng.uniform(0.25, 1, count),
                             rng.uniform(2.5, 18, count), rng.uniform(0.5, 6.2, count),
                             rng.uniform(16, 19, count)])
    h = psf_size // 2
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1]
    psf = (1 + (xx**2 + yy**2) / 1.5**2) ** -3.5
    psf /= psf.sum()
    render_all(truth[:1], psf, (size, size), 25.0)  # warm-up
    t0 = time.perf_counter()
    model, settings = render_all(truth, psf, (size, size), 25.0)
    dt = time.perf_counter() - t0
    print(f"{count} images {size}x{size}, PSF {psf_size}x{psf_size}: {dt:.3f} s "
          f"({1e3 * dt / count:.1f} ms each); settings: {settings}")
    return 0 if np.all(np.isfinite(model)) else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inp", nargs="?", help="IN.npz")
    p.add_argument("out", nargs="?", help="OUT.npz")
    p.add_argument("--selfcheck", action="store_true", help="verify the conventions (exit 1 on failure)")
    p.add_argument("--time", action="store_true", help="time 64 renders of 128x128 with a 41x41 PSF")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, a.threads))
    if a.selfcheck or a.time:
        rc = selfcheck() if a.selfcheck else 0
        return rc or (timing() if a.time else 0)
    if not (a.inp and a.out):
        p.error("IN.npz and OUT.npz are required (or --selfcheck / --time)")
    with np.load(a.inp) as d:
        truth, psf = np.asarray(d["truth"], np.float64), np.asarray(d["psf"], np.float64)
        shape, zp = tuple(int(s) for s in np.asarray(d["shape"]).ravel()), float(d["zp"])
    model, settings = render_all(truth, psf, shape, zp)
    np.savez(a.out, model=model, version=np.str_(astrophot_version()), settings=np.str_(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

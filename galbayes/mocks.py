"""Mock galaxies rendered by GalSim (an independent renderer), for tests, benchmarks, notebooks.

GalSim is a test-only dependency (``pip install galsim``). The galaxy is drawn as
``Convolve(Sérsic, Moffat PSF)`` with GalSim's default method (integrated over pixels), as
real data are. The PSF image handed to the fitter is drawn, by default, the same way
(``psf_type="effective"``: it includes the pixel response, like every PSF measured from stars);
``psf_type="optical"`` gives the old mocks' PSF, the Moffat sampled at pixel centres
(``method="no_pixel"``). Each mock's Observation carries its ``psf_type``, so the fitter
applies the pixel response once either way. Noise is Gaussian with the σ map returned (sky +
source Poisson-like variance), so the stated σ is the true one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Observation

__all__ = ["MockGalaxy", "sersic_mocks", "moffat_psf"]


@dataclass
class MockGalaxy:
    obs: Observation
    truth: dict   # sersic_<param> → true value
    init: dict    # perturbed starting values (as SExtractor would give), n started at 2
    noiseless: np.ndarray


def moffat_psf(size: int = 41, *, fwhm: float = 3.0, beta: float = 3.5, psf_type: str = "effective",
               ny: int | None = None, trunc: float = 0.0) -> np.ndarray:
    """A Moffat PSF image, unit sum: ``effective`` (GalSim's default method: integrated over
    the pixel) or ``optical`` (sampled at pixel centres, ``no_pixel``). ``size × size``
    (``ny × size`` if ``ny`` is given); even sizes are centred as galbayes aligns them
    (reference pixel ``(k-1)//2``). ``trunc > 0`` truncates the Moffat at that radius (pixels)
    so that the image holds all of its light (mocks then measure the model, not the PSF
    image's truncation)."""
    import galsim

    from .psf import check_psf_type

    method = {"effective": "auto", "optical": "no_pixel"}[check_psf_type(psf_type)]
    ny = size if ny is None else ny
    # GalSim centres a stamp at its true centre (k-1)/2; galbayes' reference pixel is (k-1)//2
    offset = (((size - 1) // 2) - (size - 1) / 2.0, ((ny - 1) // 2) - (ny - 1) / 2.0)
    psf = galsim.Moffat(beta=beta, fwhm=fwhm, trunc=trunc)
    img = psf.drawImage(nx=size, ny=ny, scale=1.0, method=method, offset=offset).array.astype(np.float64)
    return img / img.sum()


def render_sersic(*, n, re, q, pa, mag, xc, yc, shape, psf_fwhm=3.0, psf_beta=3.5, zp=22.5, gsparams=None,
                  psf_trunc=0.0):
    """GalSim image (pixel-integrated) of a Sérsic ⊛ Moffat in galbayes conventions.

    ``gsparams``: a ``galsim.GSParams`` (default: ``maximum_fft_size=16384``); ``psf_trunc``:
    the Moffat's truncation radius (0 = none)."""
    import galsim

    ny, nx = shape
    flux = 10 ** (-0.4 * (mag - zp))
    params = galsim.GSParams(maximum_fft_size=16384) if gsparams is None else gsparams
    gal = galsim.Sersic(n=n, half_light_radius=re * np.sqrt(q), flux=flux, gsparams=params)
    gal = gal.shear(q=q, beta=(pa + 90.0) * galsim.degrees)
    psf = galsim.Moffat(beta=psf_beta, fwhm=psf_fwhm, trunc=psf_trunc, gsparams=params)
    obj = galsim.Convolve(gal, psf, gsparams=params)
    offset = (xc - (nx - 1) / 2.0, yc - (ny - 1) / 2.0)
    return obj.drawImage(nx=nx, ny=ny, scale=1.0, offset=offset).array.astype(np.float64)


def sersic_mocks(count: int, *, size: int = 128, psf_size: int = 41, seed: int = 0,
                 n_range=(0.5, 6.0), re_range=(2.0, 20.0), q_range=(0.25, 1.0), mag_range=(16.0, 18.5),
                 sky_sigma: float = 0.01, gain: float = 500.0, psf_fwhm: float = 3.0,
                 perturb: bool = True, zp: float = 22.5, psf_type: str = "effective") -> list:
    """``count`` single-Sérsic mocks with truth and SExtractor-like starting values.

    Parameters
    ----------
    sky_sigma : float
        Sky noise per pixel (image units; SDSS-like nanomaggies by default).
    gain : float
        Source variance = model / gain (Poisson-like).
    perturb : bool
        Perturb the starting values (centre ±0.5 px, re ×e^N(0,0.25), q ±0.05, pa ±10°,
        mag ±0.2, n = 2); else start at the truth.
    psf_type : {"effective", "optical"}
        How the PSF image is drawn (GalSim's default method, as real PSFs are, or
        ``no_pixel``); recorded in each Observation. The galaxy images are the same either way.
    """
    rng = np.random.default_rng(seed)
    psf = moffat_psf(psf_size, fwhm=psf_fwhm, psf_type=psf_type)
    c = (size - 1) / 2.0
    out = []
    for i in range(count):
        t = {
            "sersic_xc": c + rng.uniform(-1.0, 1.0), "sersic_yc": c + rng.uniform(-1.0, 1.0),
            "sersic_pa": rng.uniform(-90.0, 90.0), "sersic_q": rng.uniform(*q_range),
            "sersic_re": float(np.exp(rng.uniform(np.log(re_range[0]), np.log(re_range[1])))),
            "sersic_n": rng.uniform(*n_range), "sersic_mag": rng.uniform(*mag_range),
        }
        img = render_sersic(n=t["sersic_n"], re=t["sersic_re"], q=t["sersic_q"], pa=t["sersic_pa"],
                            mag=t["sersic_mag"], xc=t["sersic_xc"], yc=t["sersic_yc"],
                            shape=(size, size), psf_fwhm=psf_fwhm, zp=zp)
        sigma = np.sqrt(sky_sigma**2 + np.clip(img, 0, None) / gain)
        data = img + rng.normal(size=img.shape) * sigma
        if perturb:
            init = {
                "sersic_xc": t["sersic_xc"] + rng.normal(0, 0.5), "sersic_yc": t["sersic_yc"] + rng.normal(0, 0.5),
                "sersic_pa": t["sersic_pa"] + rng.normal(0, 10.0),
                "sersic_q": float(np.clip(t["sersic_q"] + rng.normal(0, 0.05), 0.1, 1.0)),
                "sersic_re": t["sersic_re"] * float(np.exp(rng.normal(0, 0.25))),
                "sersic_n": 2.0, "sersic_mag": t["sersic_mag"] + rng.normal(0, 0.2),
            }
        else:
            init = dict(t)
        obs = Observation(image=data, sigma=sigma, psf=psf, id=f"mock{i:05d}", zp=zp, psf_type=psf_type)
        out.append(MockGalaxy(obs=obs, truth=t, init=init, noiseless=img))
    return out

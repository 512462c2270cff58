"""Background and noise of an image: sigma-clipped background level and rms, and a 1σ map
estimated from the image itself.

Used by :class:`galbayes.Observation` when no noise map is given at all, and by
``galbayes prepare`` (:mod:`galbayes.prepare`, which re-exports both functions). A low-level
module: it imports only :mod:`galbayes.errors` (and astropy/scipy when called).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError

__all__ = ["estimate_background", "estimate_sigma"]

_DEFAULT_FWHM = 3.0   # pixels, when no PSF image is available


def _stats(values):
    from astropy.stats import sigma_clipped_stats

    _, med, std = sigma_clipped_stats(values, sigma=3.0, maxiters=10)
    return float(med), float(std)


def estimate_background(image, *, mask=None, fwhm: float = _DEFAULT_FWHM):
    """Constant background level and rms of an image.

    Two passes: sigma-clipped median/std of the usable pixels; then the same after masking
    the sources detected at 2 rms (smoothed by a Gaussian of ``fwhm``) grown by ``fwhm``
    pixels, so that extended galaxy light does not inflate the rms.

    Parameters
    ----------
    image : 2-D array
    mask : 2-D bool array, optional
        True = do not use the pixel (non-finite pixels are never used).
    fwhm : float
        PSF FWHM in pixels (detection kernel).

    Returns
    -------
    (background, rms) : tuple of float
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float64)
    bad = ~np.isfinite(image) if mask is None else (~np.isfinite(image) | np.asarray(mask, bool))
    if bad.all():
        return float("nan"), float("nan")
    bkg, rms = _stats(image[~bad])
    if not rms > 0:
        return bkg, rms
    sm = ndimage.gaussian_filter(np.where(bad, bkg, image) - bkg, fwhm / 2.3548)
    ksum = 1.0 / (4 * math.pi * (fwhm / 2.3548) ** 2)          # Σk² of a unit Gaussian
    src = sm > 2.0 * rms * math.sqrt(ksum)
    src = ndimage.binary_opening(src, iterations=1)
    src = ndimage.binary_dilation(src, iterations=max(int(round(fwhm)), 1))
    use = ~bad & ~src
    if use.sum() >= max(50, 0.05 * image.size):
        bkg, rms = _stats(image[use])
    return bkg, rms


def estimate_sigma(image, *, gain=None, mask=None, background=None, fwhm: float = _DEFAULT_FWHM):
    """A 1σ map estimated from the image itself.

    ``σ = sqrt(rms² + max(image - bkg, 0) / gain)``: the sigma-clipped background rms
    (:func:`estimate_background`) plus, when ``gain`` (electrons per image unit) is known, the
    source's Poisson noise. Non-finite pixels get σ = inf (they must be masked).

    Parameters
    ----------
    image : 2-D array
    gain : float, optional
        Electrons per image unit (the header's ``GAIN`` for ADU images).
    mask : 2-D bool array, optional
        Pixels not used for the background statistics.
    background : (float, float), optional
        ``(bkg, rms)`` if already known.
    fwhm : float
        PSF FWHM in pixels (for the source masking of the background estimate).

    Returns
    -------
    2-D float64 array
    """
    image = np.asarray(image, dtype=np.float64)
    bkg, rms = background if background is not None else estimate_background(image, mask=mask, fwhm=fwhm)
    if not (np.isfinite(rms) and rms > 0):
        raise InputError(f"background rms is {rms}: cannot estimate σ (empty or constant image)", what="sigma")
    var = np.full(image.shape, rms**2)
    if gain is not None:
        if not (np.isfinite(gain) and gain > 0):
            raise InputError(f"gain must be > 0, got {gain}", what="sigma")
        var = var + np.clip(np.nan_to_num(image - bkg), 0, None) / gain
    sig = np.sqrt(var)
    sig[~np.isfinite(image)] = np.inf
    return sig

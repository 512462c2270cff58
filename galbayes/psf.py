"""PSF checks and normalisation, and zero-padded FFT convolution (no wrap-around).

Alignment: PSF pixel ``((ky-1)//2, (kx-1)//2)`` lands on the source, exactly as
``scipy.signal.fftconvolve(image, psf, mode="same")``; for odd sizes that is the centre
pixel, for even sizes the pixel just before the geometric centre (re-centre an even PSF if
your convention differs).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy.fft import next_fast_len

from .errors import InputError


def fft_shape(image_shape, psf_shape):
    """Even, FFT-friendly padded shape ≥ image + psf − 1 on each axis."""
    out = []
    for n, k in zip(image_shape, psf_shape):
        m = n + k - 1
        while True:
            m = next_fast_len(m, real=True)
            if m % 2 == 0:
                break
            m += 1
        out.append(m)
    return tuple(out)


def check_psf(psf, *, galaxy=None) -> np.ndarray:
    """Validate a PSF image and return it normalised to unit sum (float32)."""
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2:
        raise InputError(f"must be a 2-D image, got shape {psf.shape}", galaxy=galaxy, what="PSF")
    if not np.all(np.isfinite(psf)):
        raise InputError(f"has {int(np.sum(~np.isfinite(psf)))} NaN/inf pixels", galaxy=galaxy, what="PSF")
    total = psf.sum()
    if not total > 0:
        raise InputError(f"sum is {total:g}; it must be positive", galaxy=galaxy, what="PSF")
    return (psf / total).astype(np.float32)


def psf_fft(psf, image_shape):
    """rfft2 of the (normalised) PSF zero-padded to :func:`fft_shape`; numpy complex64."""
    shape = fft_shape(image_shape, psf.shape)
    return np.fft.rfft2(np.asarray(psf, np.float64), s=shape).astype(np.complex64)


def _fft_size_x(psf_fft_arr):
    return 2 * (psf_fft_arr.shape[-1] - 1)


def convolve_fft(image, psf_hat, psf_shape, extra_hat=None):
    """Linear convolution of ``image`` with the PSF whose padded rfft2 is ``psf_hat``.

    ``extra_hat`` is added to the image's transform before multiplying (point sources are
    placed there as shifted deltas). Works on the last two axes; jit/vmap friendly.
    """
    ny, nx = image.shape[-2:]
    fy, fx = psf_hat.shape[-2], _fft_size_x(psf_hat)
    img_hat = jnp.fft.rfft2(image, s=(fy, fx))
    if extra_hat is not None:
        img_hat = img_hat + extra_hat
    full = jnp.fft.irfft2(img_hat * psf_hat, s=(fy, fx))
    sy, sx = (psf_shape[0] - 1) // 2, (psf_shape[1] - 1) // 2
    return full[..., sy:sy + ny, sx:sx + nx]


def delta_hat(x, y, flux, psf_hat):
    """rfft2 of ``flux`` × a band-limited delta at sub-pixel ``(x, y)`` on the padded grid."""
    fy, fx = psf_hat.shape[-2], _fft_size_x(psf_hat)
    ky = jnp.fft.fftfreq(fy)[:, None]
    kx = jnp.fft.rfftfreq(fx)[None, :]
    phase = -2.0 * jnp.pi * (ky * y + kx * x)
    return flux * jnp.exp(1j * phase)

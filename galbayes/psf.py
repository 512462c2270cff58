"""PSF checks and normalisation, PSF kinds, and FFT convolution on a padded canvas.

Alignment: PSF pixel ``((ky-1)//2, (kx-1)//2)`` lands on the source, exactly as
``scipy.signal.fftconvolve(image, psf, mode="same")``; for odd sizes that is the centre
pixel, for even sizes the pixel just before the geometric centre (re-centre an even PSF if
your convention differs).

PSF kinds (``psf_type``):

* ``"effective"`` (default): the PSF image already contains the pixel response (every PSF
  measured from stars: SDSS psField, PSFEx, HSC/LSST; GalSim's default drawing). The model is
  (profile ⊛ PSF) sampled at pixel centres. galbayes integrates profiles over the pixel, so
  the pixel response is divided out of the PSF once, at pack time: :func:`optical_kernel`.
* ``"optical"``: the PSF sampled at pixel centres (GalSim ``method="no_pixel"``); the
  pixel-integrated profile is convolved with it as given.

A PSF image of a single pixel means "no PSF": it is used as given for either kind.

Padded canvas: convolved profiles are rendered on a canvas that extends beyond the stamp by
the PSF's half-size on each side (:func:`canvas_margin`), so light from outside the stamp is
scattered in (as Imfit and GALFIT's convolution box do), then convolved and cropped.

Shape independence (stamps zero-padded to bucket shapes must fit as at their own size):
the convolution kernel is a function of the PSF image alone (:func:`optical_kernel` works on
the PSF grid padded by the fixed :data:`DECONV_MARGIN`), zero-padded into the canvas FFT; the
canvas margin is derived from the PSF's shape only; the stamp sits at the same offset in
every canvas, so a larger FFT changes the stamp's pixels only by float rounding.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy.fft import next_fast_len

from .errors import InputError

#: The PSF kinds: ``effective`` (contains the pixel response; the default) and ``optical``.
PSF_TYPES = ("effective", "optical")
DEFAULT_PSF_TYPE = "effective"
#: Margin (pixels, each side) of the grid on which the pixel response is divided out of an
#: effective PSF; the kernel is the PSF's shape + 2 × this margin, whatever the stamp.
DECONV_MARGIN = 8
#: Effective PSFs narrower than this FWHM (pixels) are undersampled: warn.
UNDERSAMPLED_FWHM = 1.5


def check_psf_type(value, *, galaxy=None) -> str:
    """``"effective"`` or ``"optical"`` (case-insensitive); anything else is an InputError."""
    if isinstance(value, str) and value.strip().lower() in PSF_TYPES:
        return value.strip().lower()
    raise InputError(f"unknown PSF type {value!r}; use one of {list(PSF_TYPES)} ('effective': the PSF "
                     "image includes the pixel response, as PSFs measured from stars do; 'optical': "
                     "sampled at pixel centres)", galaxy=galaxy, what="psf_type")


def psf_fwhm(psf) -> float:
    """FWHM (pixels) of a PSF image from the area of its pixels above half the peak."""
    psf = np.asarray(psf, np.float64)
    area = float(np.sum(psf >= 0.5 * psf.max()))
    return 2.0 * np.sqrt(area / np.pi)


def optical_kernel(psf, psf_type: str = DEFAULT_PSF_TYPE) -> np.ndarray:
    """The kernel convolved with pixel-integrated profiles, float64, shape PSF + 2·DECONV_MARGIN.

    ``optical``: the PSF zero-padded by :data:`DECONV_MARGIN`. ``effective``: the PSF with the
    pixel response divided out, ``DFT(psf)/(sinc(kx) sinc(ky))`` on the PSF grid padded by
    :data:`DECONV_MARGIN` (sinc has no zero inside the Nyquist band; the DC term, hence the
    flux, is unchanged). The kernel depends on the PSF image alone, never on the stamp or FFT
    size. Pixel alignment is kept: its reference pixel is the PSF's plus the margin.
    """
    psf = np.asarray(psf, np.float64)
    m = DECONV_MARGIN
    padded = np.pad(psf, m)
    if psf_type == "optical" or psf.size == 1:
        return padded
    ly, lx = padded.shape
    ky = np.fft.fftfreq(ly)[:, None]
    kx = np.fft.rfftfreq(lx)[None, :]
    hat = np.fft.rfft2(padded) / (np.sinc(ky) * np.sinc(kx))
    return np.fft.irfft2(hat, s=padded.shape)


#: Smallest canvas margin: the central boxes rendered with sub-pixels (up to 11 px) and the
#: band-limited core with its halo (galbayes.geometry.core_patch: 9 + 2×12 px) then never touch
#: the canvas edge for a centre inside the stamp, so they are placed identically in a stamp
#: and in the same stamp zero-padded at the end (bucket shapes).
MIN_CANVAS_MARGIN = 17


def canvas_margin(psf_shape) -> tuple:
    """Rows/columns rendered beyond each side of the stamp: the PSF's half-size (at least
    :data:`MIN_CANVAS_MARGIN`). A function of the PSF's shape only."""
    return tuple(max(int(k) // 2, MIN_CANVAS_MARGIN) for k in psf_shape)


def _fast_even(m):
    while True:
        m = next_fast_len(m, real=True)
        if m % 2 == 0:
            return m
        m += 1


def canvas_fft_shape(image_shape, psf_shape) -> tuple:
    """FFT shape for the padded canvas: no wrap-around reaches the stamp's pixels.

    The canvas is the stamp + :func:`canvas_margin` on each side; the kernel is
    ``psf_shape + 2·DECONV_MARGIN``; the stamp's pixels are exact (no wrap-around) when the
    FFT length is at least ``n + margin + max(margin, kernel//2)`` on each axis.
    """
    out = []
    for n, k, m in zip(image_shape, psf_shape, canvas_margin(psf_shape)):
        kk = k + 2 * DECONV_MARGIN
        out.append(_fast_even(n + m + max(m, kk // 2)))
    return tuple(out)


def canvas_shape(image_shape, psf_shape) -> tuple:
    """Shape of the padded canvas: the stamp + :func:`canvas_margin` on each side."""
    return tuple(n + 2 * m for n, m in zip(image_shape, canvas_margin(psf_shape)))


def kernel_fft(kernel, fft_shape_) -> np.ndarray:
    """rfft2 of a kernel zero-padded (at the end) to ``fft_shape_``; numpy complex64."""
    return np.fft.rfft2(np.asarray(kernel, np.float64), s=fft_shape_).astype(np.complex64)


def convolve_canvas(canvas, kernel_hat, psf_shape, image_shape, extra_hat=None, extra_kernel_hat=None):
    """Convolve a padded canvas (:func:`canvas_shape`) and crop the stamp.

    ``kernel_hat`` is :func:`kernel_fft` of :func:`optical_kernel`; ``extra_hat`` (point
    sources as shifted deltas, canvas coordinates) is multiplied by ``extra_kernel_hat``
    (the padded PSF as given: a star's image is the PSF image) and added before the inverse
    transform. ``canvas`` may be ``None`` (point sources only). jit/vmap friendly.
    """
    fy, fx = kernel_hat.shape[-2], _fft_size_x(kernel_hat)
    total = None
    if canvas is not None:
        total = jnp.fft.rfft2(canvas, s=(fy, fx)) * kernel_hat
    if extra_hat is not None:
        term = extra_hat * extra_kernel_hat
        total = term if total is None else total + term
    full = jnp.fft.irfft2(total, s=(fy, fx))
    my, mx = canvas_margin(psf_shape)
    cy = (psf_shape[0] + 2 * DECONV_MARGIN - 1) // 2
    cx = (psf_shape[1] + 2 * DECONV_MARGIN - 1) // 2
    ny, nx = image_shape
    return full[..., my + cy:my + cy + ny, mx + cx:mx + cx + nx]


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

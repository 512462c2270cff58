"""One galaxy's arrays (image, σ, mask, PSF) with validation, and FITS loading."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .psf import check_psf, check_psf_type

__all__ = ["Observation", "load_fits", "mask_to_weight"]


def load_fits(path, *, hdu=None, galaxy=None, what="image") -> np.ndarray:
    """Read a 2-D image from a FITS file.

    Parameters
    ----------
    path : str or Path
        FITS file.
    hdu : int or str, optional
        HDU index or name; default: the first HDU holding a 2-D image.
    """
    from astropy.io import fits

    if path is None or str(path) in ("", "."):
        raise InputError("no file given", galaxy=galaxy, what=what)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}", galaxy=galaxy, what=what)
    try:
        with fits.open(path, memmap=False) as hdul:
            if hdu is None:
                for h in hdul:
                    if h.data is not None and getattr(h.data, "ndim", 0) == 2:
                        return np.asarray(h.data).astype(np.float64)
                raise InputError(f"no 2-D image HDU in {path}", galaxy=galaxy, what=what)
            data = hdul[hdu].data
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise InputError(f"cannot read {path}: {exc}", galaxy=galaxy, what=what) from None
    if data is None or np.ndim(data) != 2:
        raise InputError(f"HDU {hdu!r} of {path} holds no 2-D image", galaxy=galaxy, what=what)
    return np.asarray(data).astype(np.float64)


def mask_to_weight(mask, *, keep=None) -> np.ndarray:
    """Pixel weights Ω (1 = fit the pixel) from a mask.

    With ``keep=None`` a non-zero mask pixel is masked. With a segmentation map and
    ``keep=v`` (the paper's ``mask_index``) pixels equal to 0 or ``v`` are kept and every
    other value is masked.
    """
    mask = np.asarray(mask)
    if keep is None:
        return (mask == 0).astype(np.float32)
    return ((mask == 0) | (mask == keep)).astype(np.float32)


@dataclass
class Observation:
    """A validated galaxy cutout.

    Parameters
    ----------
    image, sigma : 2-D arrays
        Data and its 1σ uncertainty, same shape.
    psf : 2-D array
        PSF image (any size; normalised to unit sum here).
    mask : 2-D array, optional
        Non-zero = masked, or a segmentation map with ``mask_keep``.
    mask_keep : int, optional
        Segmentation value to keep (with 0).
    id : str, optional
        Galaxy name used in messages and outputs.
    zp : float
        Magnitude zero point.
    pixel_scale : float, optional
        Arcsec per pixel (needed for models with ``size_unit="arcsec"``).
    psf_type : {"effective", "optical"}, optional
        Kind of the PSF image: ``"effective"`` includes the pixel response (every PSF measured
        from stars, GalSim's default drawing), ``"optical"`` is sampled at pixel centres
        (GalSim ``no_pixel``). ``None``: the model's choice, by default ``"effective"``.

    Raises
    ------
    InputError
        NaN/inf in unmasked pixels, σ ≤ 0 or non-finite where unmasked, shape mismatch,
        a bad PSF, or an image with every pixel masked.
    """

    image: np.ndarray
    sigma: np.ndarray
    psf: np.ndarray
    mask: np.ndarray | None = None
    mask_keep: int | None = None
    id: str | None = None
    zp: float = 22.5
    pixel_scale: float | None = None
    psf_type: str | None = None
    weight: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        gid = self.id
        image = np.asarray(self.image, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if image.ndim != 2:
            raise InputError(f"must be 2-D, got shape {image.shape}", galaxy=gid, what="image")
        if sigma.shape != image.shape:
            raise InputError(f"shape {sigma.shape} differs from the image's {image.shape}", galaxy=gid, what="sigma")
        if self.mask is None:
            weight = np.ones(image.shape, np.float32)
        else:
            mask = np.asarray(self.mask)
            if mask.shape != image.shape:
                raise InputError(f"shape {mask.shape} differs from the image's {image.shape}", galaxy=gid, what="mask")
            weight = mask_to_weight(mask, keep=self.mask_keep)
        use = weight > 0
        if not use.any():
            raise InputError("every pixel is masked", galaxy=gid, what="mask")
        bad = use & ~np.isfinite(image)
        if bad.any():
            raise InputError(f"{int(bad.sum())} unmasked NaN/inf pixel(s), first at (row, col) "
                             f"{tuple(int(v) for v in np.argwhere(bad)[0])}", galaxy=gid, what="image")
        bad = use & ~(np.isfinite(sigma) & (sigma > 0))
        if bad.any():
            raise InputError(f"{int(bad.sum())} unmasked pixel(s) with σ ≤ 0 or NaN/inf, first at (row, col) "
                             f"{tuple(int(v) for v in np.argwhere(bad)[0])}", galaxy=gid, what="sigma")
        if not np.isfinite(self.zp):
            raise InputError(f"zero point is {self.zp}", galaxy=gid, what="zp")
        if self.pixel_scale is not None and not (np.isfinite(self.pixel_scale) and self.pixel_scale > 0):
            raise InputError(f"pixel scale must be > 0, got {self.pixel_scale}", galaxy=gid, what="pixel_scale")
        psf = check_psf(self.psf, galaxy=gid)
        if self.psf_type is not None:
            self.psf_type = check_psf_type(self.psf_type, galaxy=gid)
        if psf.shape[0] > 2 * image.shape[0] + 1 or psf.shape[1] > 2 * image.shape[1] + 1:
            raise InputError(f"shape {psf.shape} is larger than twice the image {image.shape}", galaxy=gid, what="PSF")
        # Masked pixels carry no information: give them harmless values.
        self.image = np.where(use, image, 0.0).astype(np.float32)
        self.sigma = np.where(use, sigma, 1.0).astype(np.float32)
        self.psf = psf
        self.weight = weight
        self.mask = None if self.mask is None else np.asarray(self.mask)

    @property
    def shape(self):
        return self.image.shape

    @property
    def n_pixels(self) -> int:
        """Number of unmasked pixels."""
        return int(self.weight.sum())

    @classmethod
    def from_fits(cls, *, image, sigma, psf, mask=None, mask_keep=None, id=None, zp=22.5,
                  pixel_scale=None, hdu=None, psf_type=None):
        """Load the four images from FITS files (``hdu``: one HDU for all, or a dict by role)."""
        def h(role):
            return hdu.get(role) if isinstance(hdu, dict) else hdu
        return cls(
            image=load_fits(image, hdu=h("image"), galaxy=id, what="image"),
            sigma=load_fits(sigma, hdu=h("sigma"), galaxy=id, what="sigma"),
            psf=load_fits(psf, hdu=h("psf"), galaxy=id, what="PSF"),
            mask=None if mask is None else load_fits(mask, hdu=h("mask"), galaxy=id, what="mask"),
            mask_keep=mask_keep, id=id, zp=zp, pixel_scale=pixel_scale, psf_type=psf_type)

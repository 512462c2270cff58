"""One galaxy's arrays (image, noise, mask, PSF) with validation, and FITS loading.

Noise as surveys ship it
    One of ``sigma`` (1σ), ``rms`` (the same), ``variance`` (σ²) or ``ivar`` (1/σ², called
    ``weight`` in many pipelines); a pixel with ``ivar = 0`` or a non-finite ``variance`` carries
    no information and is masked (weight 0), never divided by. A negative variance or ivar, a
    zero variance (infinite ivar) or a σ ≤ 0 / non-finite σ in an unmasked pixel is an
    :class:`~galbayes.errors.InputError` naming the galaxy. With no noise map at all, σ is
    estimated from the image (:func:`galbayes.noise.estimate_sigma`: sigma-clipped
    background rms, plus the source's Poisson noise ``max(image − bkg, 0) / gain`` when a gain
    is known, from the ``gain`` argument or the image header's ``GAIN``) and
    :attr:`Observation.notes` says so (a catalog run's status becomes ``ok; sigma estimated
    from image ...``).
FITS extensions
    A path may name its HDU: ``calexp.fits[VARIANCE]`` (EXTNAME), ``file.fits[2]`` (0-based
    index), ``file.fits[SCI,2]`` (EXTNAME and EXTVER); this overrides the ``hdu`` argument.
    Without either, the first HDU holding a 2-D image is read.
Masks
    Non-zero = masked; or a segmentation map with ``mask_keep = v`` (keep 0 and v); or a
    bit-plane mask with ``mask_bits``: the bits to reject, as an integer bitmask (``5`` =
    bits 0 and 2; also ``"0x5"``) or a list of bit numbers (``[0, 2]``, in a catalog the
    text ``"0,2"``; a single bit number needs the comma: ``"2,"``). Bit *names* (``"BAD,SAT,CR"``)
    are resolved from the mask HDU's ``MP_<NAME>`` header cards (LSST) when read from FITS.
    Pixels with any other bit set are kept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .psf import check_psf, check_psf_type

__all__ = ["Observation", "load_fits", "mask_to_weight", "split_extension", "parse_mask_bits", "NOISE_KINDS"]

#: Ways to give the noise (``weight`` is accepted as a name of ``ivar`` in catalogs and from_fits).
NOISE_KINDS = ("sigma", "variance", "ivar", "rms")

_EXT = re.compile(r"^(.*)\[([^\[\]]*)\]$")


def split_extension(path):
    """``"file.fits[VARIANCE]"`` → ``("file.fits", "VARIANCE")``; ``[2]`` → 2 (0-based index);
    ``[SCI,2]`` → ``("SCI", 2)`` (EXTNAME, EXTVER); a path without brackets (or an existing file
    whose name ends in brackets) → ``(path, None)``."""
    if path is None:
        return None, None
    text = str(path)
    m = _EXT.match(text)
    if m is None or Path(text).is_file():
        return path, None
    name, ext = m.group(1), m.group(2).strip()
    if not ext:
        raise InputError(f"{text}: empty extension '[]'", what="FITS path")
    if re.fullmatch(r"\d+", ext):
        return name, int(ext)
    if "," in ext:
        extname, _, ver = (p.strip() for p in ext.partition(","))
        if not (extname and re.fullmatch(r"\d+", ver)):
            raise InputError(f"{text}: extension {ext!r} is neither NAME, INDEX nor NAME,VERSION", what="FITS path")
        return name, (extname, int(ver))
    return name, ext


def _read_hdu(path, *, hdu=None, galaxy=None, what="image"):
    """``(data, header of that HDU, primary header)`` of a 2-D image (see :func:`load_fits`)."""
    from astropy.io import fits

    if path is None or str(path) in ("", "."):
        raise InputError("no file given", galaxy=galaxy, what=what)
    path, ext = split_extension(path)
    if ext is not None:
        hdu = ext
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}", galaxy=galaxy, what=what)
    try:
        with fits.open(path, memmap=False) as hdul:
            if hdu is None:
                for h in hdul:
                    if h.data is not None and getattr(h.data, "ndim", 0) == 2:
                        return np.asarray(h.data), h.header.copy(), hdul[0].header.copy()
                raise InputError(f"no 2-D image HDU in {path}", galaxy=galaxy, what=what)
            try:
                h = hdul[hdu]
            except (KeyError, IndexError):
                have = ", ".join(f"{i} {x.name}" + (f",{x.ver}" if x.ver > 1 else "") for i, x in enumerate(hdul))
                raise InputError(f"{path} has no extension {hdu!r} (it has: {have})",
                                 galaxy=galaxy, what=what) from None
            data, header, primary = h.data, h.header.copy(), hdul[0].header.copy()
            data = None if data is None else np.asarray(data)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise InputError(f"cannot read {path}: {exc}", galaxy=galaxy, what=what) from None
    if data is None or np.ndim(data) != 2:
        raise InputError(f"HDU {hdu!r} of {path} holds no 2-D image", galaxy=galaxy, what=what)
    return data, header, primary


def load_fits(path, *, hdu=None, galaxy=None, what="image") -> np.ndarray:
    """Read a 2-D image from a FITS file.

    Parameters
    ----------
    path : str or Path
        FITS file, optionally naming its HDU: ``file.fits[NAME]``, ``file.fits[INDEX]`` or
        ``file.fits[NAME,VERSION]`` (overrides ``hdu``).
    hdu : int or str, optional
        HDU index or name; default: the first HDU holding a 2-D image.
    """
    return np.asarray(_read_hdu(path, hdu=hdu, galaxy=galaxy, what=what)[0]).astype(np.float64)


def parse_mask_bits(bits, *, planes: dict | None = None, galaxy=None) -> int | None:
    """The integer bitmask of ``mask_bits`` (see the module docstring): an int (or an integer
    text, decimal or ``0x`` hex) is the bitmask; a list, or a text with commas, holds bit
    numbers 0–62 or names looked up in ``planes`` (name → bit number, e.g. from ``MP_*``
    header cards)."""
    if bits is None:
        return None
    if isinstance(bits, (bool, np.bool_)):
        raise InputError(f"mask_bits must be a bitmask or a list of bits, got {bits!r}", galaxy=galaxy,
                         what="mask_bits")
    if isinstance(bits, (int, np.integer)):
        items, value = None, int(bits)
    elif isinstance(bits, (float, np.floating)) and float(bits).is_integer():
        items, value = None, int(bits)
    elif isinstance(bits, str):
        text = bits.strip()
        if re.fullmatch(r"\d+", text):
            items, value = None, int(text)
        elif re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            items, value = None, int(text, 16)
        else:
            items, value = [t.strip() for t in text.split(",") if t.strip()], None
    else:
        try:
            items, value = list(bits), None
        except TypeError:
            raise InputError(f"mask_bits must be a bitmask or a list of bits, got {bits!r}", galaxy=galaxy,
                             what="mask_bits") from None
    if value is not None:
        if value < 0:
            raise InputError(f"bitmask must be ≥ 0, got {value}", galaxy=galaxy, what="mask_bits")
        return value
    value = 0
    for item in items:
        if isinstance(item, (int, np.integer)) or (isinstance(item, str) and re.fullmatch(r"\d+", item)):
            bit = int(item)
        else:
            name = str(item).upper()
            known = {str(k).upper(): v for k, v in (planes or {}).items()}
            if name not in known:
                where = (f"known planes: {', '.join(sorted(known))}" if known else
                         "no MP_<NAME> bit-plane cards in the mask header (give bit numbers)")
                raise InputError(f"unknown mask plane {item!r} ({where})", galaxy=galaxy, what="mask_bits")
            bit = int(known[name])
        if not 0 <= bit <= 62:
            raise InputError(f"bit number {bit} outside 0..62", galaxy=galaxy, what="mask_bits")
        value |= 1 << bit
    if not value:
        raise InputError(f"no bits in {bits!r}", galaxy=galaxy, what="mask_bits")
    return value


def mask_planes(header) -> dict:
    """Bit-plane names of a mask HDU header: ``MP_<NAME> = bit`` cards (LSST) → {NAME: bit}."""
    out = {}
    for key, v in (header or {}).items():
        if str(key).upper().startswith("MP_") and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[str(key)[3:].upper()] = int(v)
    return out


def mask_to_weight(mask, *, keep=None, bits=None) -> np.ndarray:
    """Pixel weights Ω (1 = fit the pixel) from a mask.

    With ``keep=None`` a non-zero mask pixel is masked. With a segmentation map and
    ``keep=v`` (the paper's ``mask_index``) pixels equal to 0 or ``v`` are kept and every
    other value is masked. With ``bits`` (an integer bitmask) a pixel is masked when any of
    those bits is set, whatever its other bits.
    """
    mask = np.asarray(mask)
    if bits is not None:
        if mask.dtype.kind == "f":
            if not np.all(np.isfinite(mask) & (mask == np.round(mask))):
                raise InputError("a bit-plane mask must hold integers")
        return ((mask.astype(np.int64) & int(bits)) == 0).astype(np.float32)
    if keep is None:
        return (mask == 0).astype(np.float32)
    return ((mask == 0) | (mask == keep)).astype(np.float32)


@dataclass
class Observation:
    """A validated galaxy cutout.

    Parameters
    ----------
    image : 2-D array
        Data.
    sigma : 2-D array, optional
        Its 1σ uncertainty, same shape; or give ``rms`` (the same), ``variance`` or ``ivar``
        instead (at most one of the four). None of them: σ estimated from the image (see
        the module docstring; :attr:`notes` says so).
    psf : 2-D array
        PSF image (any size; normalised to unit sum here). Required.
    mask : 2-D array, optional
        Non-zero = masked, or a segmentation map with ``mask_keep``, or a bit-plane mask
        with ``mask_bits``.
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
    variance, ivar, rms : 2-D arrays, optional
        The noise as σ², 1/σ² or σ. ``ivar = 0`` and non-finite variance pixels are masked.
    mask_bits : int or list, optional
        Bits of ``mask`` to reject: an integer bitmask or a list of bit numbers (or a
        comma-separated text of them; names only through :meth:`from_fits`).
    gain : float, optional
        Electrons per image unit, for the Poisson term of an estimated σ.

    Attributes
    ----------
    weight : 2-D float32 array
        Ω, 1 = fit the pixel (mask, and pixels without noise information).
    noise : str
        How σ was obtained: ``"sigma"``, ``"rms"``, ``"variance"``, ``"ivar"`` or ``"estimated"``.
    notes : list of str
        Remarks for the results' status (``"sigma estimated from image ..."``).

    Raises
    ------
    InputError
        NaN/inf in unmasked pixels, σ ≤ 0 or non-finite where unmasked (a negative variance
        or ivar, zero variance), more than one noise map, shape mismatch, a bad PSF or mask
        bits, or an image with every pixel masked.
    """

    image: np.ndarray
    sigma: np.ndarray | None = None
    psf: np.ndarray | None = None
    mask: np.ndarray | None = None
    mask_keep: int | None = None
    id: str | None = None
    zp: float = 22.5
    pixel_scale: float | None = None
    psf_type: str | None = None
    variance: np.ndarray | None = field(default=None, repr=False)
    ivar: np.ndarray | None = field(default=None, repr=False)
    rms: np.ndarray | None = field(default=None, repr=False)
    mask_bits: object = None
    gain: float | None = None
    weight: np.ndarray = field(init=False, repr=False)
    noise: str = field(init=False, default="sigma")
    notes: list = field(init=False, default_factory=list)

    def __post_init__(self):
        gid = self.id
        image = np.asarray(self.image, dtype=np.float64)
        if image.ndim != 2:
            raise InputError(f"must be 2-D, got shape {image.shape}", galaxy=gid, what="image")
        if self.psf is None:
            raise InputError("no PSF given", galaxy=gid, what="PSF")
        given = [(k, getattr(self, k)) for k in NOISE_KINDS if getattr(self, k) is not None]
        if len(given) > 1:
            raise InputError(f"give one noise map (sigma, variance, ivar or rms), got {[k for k, _ in given]}",
                             galaxy=gid, what="noise")
        kind, noise = given[0] if given else ("estimated", None)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float64)
            if noise.shape != image.shape:
                raise InputError(f"shape {noise.shape} differs from the image's {image.shape}", galaxy=gid, what=kind)
        if self.mask is None:
            if self.mask_bits is not None:
                raise InputError("mask_bits given without a mask", galaxy=gid, what="mask_bits")
            weight = np.ones(image.shape, np.float32)
        else:
            mask = np.asarray(self.mask)
            if mask.shape != image.shape:
                raise InputError(f"shape {mask.shape} differs from the image's {image.shape}", galaxy=gid, what="mask")
            bits = parse_mask_bits(self.mask_bits, galaxy=gid)
            if bits is not None and self.mask_keep is not None:
                raise InputError("give mask_keep (segmentation map) or mask_bits (bit planes), not both",
                                 galaxy=gid, what="mask")
            try:
                weight = mask_to_weight(mask, keep=self.mask_keep, bits=bits)
            except ValueError as exc:
                raise InputError(str(exc), galaxy=gid, what="mask") from None
        if kind in ("variance", "ivar"):
            # no information (ivar = 0 or NaN, variance inf/NaN): masked, never divided by
            weight = np.where(np.isnan(noise) | (noise == 0) if kind == "ivar" else ~np.isfinite(noise),
                              np.float32(0), weight).astype(np.float32)
        use = weight > 0
        if not use.any():
            raise InputError("every pixel is masked" + (f" (mask and {kind} map)" if kind in ("variance", "ivar")
                                                        else ""), galaxy=gid, what="mask")
        bad = use & ~np.isfinite(image)
        if bad.any():
            raise InputError(f"{int(bad.sum())} unmasked NaN/inf pixel(s), first at (row, col) "
                             f"{tuple(int(v) for v in np.argwhere(bad)[0])}", galaxy=gid, what="image")
        if kind in ("variance", "ivar"):
            bad = use & (noise <= 0 if kind == "variance" else (noise < 0) | ~np.isfinite(noise))
            if bad.any():
                problem = ("≤ 0 (σ = 0 or imaginary)" if kind == "variance" else "< 0 or inf (σ imaginary or 0)")
                raise InputError(f"{int(bad.sum())} unmasked pixel(s) with {kind} {problem}, first at (row, col) "
                                 f"{tuple(int(v) for v in np.argwhere(bad)[0])}", galaxy=gid, what=kind)
            ok = use & (noise > 0)        # elsewhere masked: σ only where it is informative
            safe = np.where(ok, noise, 1.0)
            sigma = np.where(ok, np.sqrt(safe) if kind == "variance" else 1.0 / np.sqrt(safe), 1.0)
        elif kind == "estimated":
            sigma = self._estimate_sigma(image, ~use)
        else:
            sigma = noise
        bad = use & ~(np.isfinite(sigma) & (sigma > 0))
        if bad.any():
            raise InputError(f"{int(bad.sum())} unmasked pixel(s) with σ ≤ 0 or NaN/inf, first at (row, col) "
                             f"{tuple(int(v) for v in np.argwhere(bad)[0])}", galaxy=gid,
                             what="sigma" if kind == "sigma" else f"sigma ({kind})")
        self.noise = kind
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
        self.variance = self.ivar = self.rms = None   # folded into sigma and weight

    def _estimate_sigma(self, image, masked):
        """σ from the image (see the module docstring); records a note."""
        from .noise import estimate_sigma

        gain = self.gain
        if gain is not None and not (np.isfinite(gain) and gain > 0):
            raise InputError(f"gain must be > 0, got {gain}", galaxy=self.id, what="gain")
        try:
            sigma = estimate_sigma(np.where(masked, np.nan, image), gain=gain, mask=masked)
        except InputError as exc:
            raise InputError(exc.problem, galaxy=self.id, what=exc.what or "sigma") from None
        how = f"background rms + Poisson, gain {gain:g}" if gain else "background rms only, no gain"
        self.notes.append(f"sigma estimated from image ({how})")
        return sigma

    @property
    def shape(self):
        return self.image.shape

    @property
    def n_pixels(self) -> int:
        """Number of unmasked pixels."""
        return int(self.weight.sum())

    @classmethod
    def from_fits(cls, *, image, sigma=None, psf, mask=None, mask_keep=None, id=None, zp=22.5,
                  pixel_scale=None, hdu=None, psf_type=None, variance=None, ivar=None, weight=None,
                  rms=None, mask_bits=None, gain=None):
        """Load the images from FITS files (``hdu``: one HDU for all, or a dict by role; a path
        may name its own, ``file.fits[NAME]``, ``[INDEX]`` or ``[NAME,VERSION]``).

        The noise is one of ``sigma``, ``rms``, ``variance``, ``ivar`` or ``weight`` (= ivar);
        none: estimated from the image, with ``gain`` or else the image header's ``GAIN``
        (image HDU, then primary). ``mask_bits`` may name bit planes (``"BAD,SAT"``) defined
        by ``MP_<NAME>`` cards of the mask HDU's header.
        """
        def h(role):
            if isinstance(hdu, dict):
                return hdu.get(role, hdu.get("sigma") if role in NOISE_KINDS else None)
            return hdu
        if weight is not None:
            if ivar is not None:
                raise InputError("give ivar or weight (the same thing), not both", galaxy=id, what="noise")
            ivar = weight
        noise = {k: v for k, v in (("sigma", sigma), ("variance", variance), ("ivar", ivar), ("rms", rms))
                 if v is not None}
        if len(noise) > 1:
            raise InputError(f"give one noise map (sigma, variance, ivar/weight or rms), got {sorted(noise)}",
                             galaxy=id, what="noise")
        data, header, primary = _read_hdu(image, hdu=h("image"), galaxy=id, what="image")
        maps = {k: load_fits(v, hdu=h(k), galaxy=id, what=k) for k, v in noise.items()}
        if not noise and gain is None:
            for hd in (header, primary):
                g = hd.get("GAIN")
                if isinstance(g, (int, float, np.integer, np.floating)) and not isinstance(g, bool) \
                        and np.isfinite(g) and g > 0:
                    gain = float(g)
                    break
        mask_arr = None
        if mask is not None:
            raw, mhdr, _ = _read_hdu(mask, hdu=h("mask"), galaxy=id, what="mask")
            mask_arr = np.asarray(raw)
            mask_arr = mask_arr.astype(np.int64) if mask_arr.dtype.kind in "iub" else mask_arr.astype(np.float64)
            if mask_bits is not None:
                mask_bits = parse_mask_bits(mask_bits, planes=mask_planes(mhdr), galaxy=id)
        return cls(
            image=np.asarray(data).astype(np.float64), **maps,
            psf=load_fits(psf, hdu=h("psf"), galaxy=id, what="PSF"),
            mask=mask_arr, mask_keep=mask_keep, mask_bits=mask_bits, gain=gain,
            id=id, zp=zp, pixel_scale=pixel_scale, psf_type=psf_type)

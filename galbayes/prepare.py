"""From survey data products to a fit catalog: detection, masks, σ maps, starting values.

``galbayes prepare`` (and :func:`prepare_cutouts`, :func:`prepare_frame`) turn either a set of
existing cutouts or a large image with a WCS plus a list of RA/Dec positions into a catalog
that ``galbayes fit CATALOG --model sersic`` runs directly. For each target:

1. **Background and noise** (:func:`estimate_background`): sigma-clipped median and rms of the
   pixels left after masking the detected sources (two passes). With no σ map,
   :func:`estimate_sigma` gives ``sqrt(rms² + max(image - bkg, 0) / gain)`` (the Poisson term
   only when a gain is known: the image header's ``GAIN`` or an option).
2. **Detection and deblending** (photutils.segmentation): the background-subtracted image is
   smoothed by a Gaussian of the PSF's FWHM, thresholded at ``n_sigma`` × rms with at least
   ``n_pixels`` connected pixels (:func:`~photutils.segmentation.detect_sources`), and
   deblended (:func:`~photutils.segmentation.deblend_sources`, multi-threshold with
   ``contrast``).
3. **Target**: the segment containing the target position (the cutout centre, or the given
   RA/Dec), else the segment nearest to it within ``max_offset`` pixels.
4. **Mask** of the OTHER sources: their segments dilated by a disk of radius
   ``dilate + dilate_scale · sqrt(area/π)`` pixels (scaled with each source's size), never
   into the target's own segment; plus non-finite pixels. Then a **residual pass**
   (:func:`residual_sources`, on by default): a smooth model of the target (the median of
   the unmasked light in elliptical annuli of its centre, ``pa`` and ``q``) is subtracted and
   the residual detected the same way; compact residual sources (each at most
   ``RESIDUAL_MAX_AREA`` of the target segment's area) lying on the target's segment,
   farther than ``max(2·r50, 3·FWHM)`` from its centre, are companions the deblending left
   in the target (a faint galaxy or a star on its wings): they are masked (dilated the same
   way). Last, the **outshine pass** (:func:`outshine_masks`, on by default) cuts and grows
   each other source's mask to where it outshines the target: the target and each neighbour
   get a smooth model (elliptical-annulus medians, ending where an annulus is no longer
   detected; the neighbour's from the image less the target's model), and a neighbour's
   mask is its segment, its dilated segment less the pixels where the target's model is the
   brighter (there: the neighbour's model reaches them, or the target is above
   ``OUTSHINE_FLOOR`` rms), and every pixel where its model is brighter than the target's.
   The estimates are measured again. Written as a 0/1 FITS mask (1 = masked) beside the
   segmentation map.
5. **Starting values** from the target's light (:func:`measure_target`): the masked pixels are
   filled by their point-reflection through the centre (else 0), the centre is a windowed
   first moment, ``pa``/``q`` come from the second moments of the segment's light with the
   PSF's (Gaussian-equivalent) moments subtracted, and ``re``, ``n`` and the magnitude from a
   Sérsic curve-of-growth fit to the light in elliptical annuli out to the largest ellipse
   inside the cutout (so the total flux is extrapolated as a Sérsic profile would be); ``re``
   is corrected for the PSF in quadrature (``re² = re_obs² - r50_psf²``). Conventions as in
   the rest of galbayes: 0-based pixel centres, ``pa`` in degrees counter-clockwise from +y,
   ``re`` along the major axis, ``q = b/a``, ``mag = zp - 2.5 log10 F``.

Frame cutouts (:func:`prepare_frame`) are cut with :class:`astropy.nddata.Cutout2D` around
each position with a side of ``size_factor`` × the target's segment extent (at least
``min_size``), rounded up to the stamp buckets of :mod:`galbayes.batching`
(:func:`snap_shape`, built on :func:`galbayes.batching.bucket_size`) and clipped to the image.

Outputs, beside the catalog: ``<stem>_prep/`` (masks, segmentation maps, estimated σ maps and
frame cutouts), ``prepare_status.csv`` (one row per target in input order: ``id``,
``status`` = ``ok`` or the reason it was left out, and notes), ``prepare.json`` (the settings),
and with ``data_bounds`` per-galaxy bounds columns centred on the estimates (``sersic_xc_lo``, ...,
see :func:`data_bounds`), which ``galbayes fit`` applies as those galaxies' bounds and priors. The catalog itself holds only the targets that were prepared; its
extra columns (``segmap``, ``prepare_note``, ``ra``, ``dec``, ...) are carried along unread
by ``galbayes fit``. A target that fails never stops the run.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batching import bucket_size
from .errors import InputError
from .noise import _DEFAULT_FWHM, estimate_background, estimate_sigma
from .params import wrap_angle
from .status import OK

__all__ = ["estimate_background", "estimate_sigma", "psf_fwhm", "psf_r50", "snap_shape", "detect",
           "measure_target", "residual_sources", "outshine_masks", "analyse_cutout", "CutoutAnalysis", "data_bounds", "prepare_cutouts",
           "prepare_frame", "SERSIC_COLUMNS", "ZP_KEYWORDS"]

#: Initial-value columns written for the default ``sersic`` recipe.
SERSIC_COLUMNS = ("sersic_xc", "sersic_yc", "sersic_pa", "sersic_q", "sersic_re", "sersic_mag", "sersic_n")
#: Header keywords read (in this order) for the zero point when none is given.
ZP_KEYWORDS = ("MAGZP", "MAGZERO", "ZEROPT", "PHOTZP", "ZP")
_DEFAULT_ZP = 22.5


# --------------------------------------------------------------------------- PSF figures
def _psf_norm(psf):
    psf = np.nan_to_num(np.asarray(psf, dtype=np.float64))
    s = psf.sum()
    return psf / s if s > 0 else psf


def psf_fwhm(psf) -> float:
    """FWHM (pixels) of a PSF image from the area above half its peak: ``2 sqrt(A/π)``."""
    if psf is None:
        return _DEFAULT_FWHM
    p = _psf_norm(psf)
    peak = p.max()
    if not peak > 0:
        return _DEFAULT_FWHM
    return float(max(2.0 * math.sqrt((p >= 0.5 * peak).sum() / math.pi), 1.0))


def psf_r50(psf) -> float:
    """Half-light radius (pixels) of a PSF image about its centroid."""
    if psf is None:
        return 0.5 * _DEFAULT_FWHM
    p = _psf_norm(psf)
    y, x = np.mgrid[: p.shape[0], : p.shape[1]]
    xc, yc = (p * x).sum(), (p * y).sum()
    r = np.hypot(x - xc, y - yc).ravel()
    order = np.argsort(r)
    cum = np.cumsum(p.ravel()[order])
    return float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])


# --------------------------------------------------------------------------- shapes
def snap_shape(shape) -> tuple:
    """Each axis rounded UP to the stamp buckets of :mod:`galbayes.batching`
    (:func:`~galbayes.batching.bucket_size`: 2ᵏ or 1.5·2ᵏ pixels)."""
    return tuple(bucket_size(int(math.ceil(n))) for n in shape)


# --------------------------------------------------------------------------- detection
def detect(data, *, rms, fwhm: float = _DEFAULT_FWHM, mask=None, n_sigma: float = 1.5, n_pixels: int = 5,
           deblend: bool = True, contrast: float = 0.02, n_levels: int = 32):
    """Detect and deblend the sources of a background-subtracted image (photutils).

    Parameters
    ----------
    data : 2-D array
        Background-subtracted image.
    rms : float
        Background rms per pixel.
    fwhm : float
        Gaussian smoothing kernel FWHM (the PSF's).
    mask : 2-D bool array, optional
        Pixels to ignore (never part of a segment).
    n_sigma, n_pixels : float, int
        Detection threshold on the smoothed image in units of ``rms`` and the minimum number
        of connected pixels (SExtractor's ``DETECT_THRESH`` and ``DETECT_MINAREA``).
    deblend, contrast, n_levels
        Multi-threshold deblending (:func:`photutils.segmentation.deblend_sources`).

    Returns
    -------
    photutils.segmentation.SegmentationImage or None (no source).
    """
    from astropy.convolution import convolve
    from photutils.segmentation import deblend_sources, detect_sources, make_2dgaussian_kernel
    from photutils.utils import NoDetectionsWarning

    data = np.asarray(data, dtype=np.float64)
    bad = ~np.isfinite(data) if mask is None else (~np.isfinite(data) | np.asarray(mask, bool))
    size = 2 * int(math.ceil(1.5 * fwhm)) + 1
    kernel = make_2dgaussian_kernel(fwhm, size=size)
    conv = convolve(np.where(bad, 0.0, data), kernel, normalize_kernel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        seg = detect_sources(conv, n_sigma * rms, n_pixels, mask=bad)
        if seg is None:
            return None
        if deblend and seg.n_labels:
            try:
                seg = deblend_sources(conv, seg, n_pixels, n_levels=n_levels, contrast=contrast,
                                      progress_bar=False)
            except ValueError:       # too few pixels to deblend: keep the parents
                pass
    return seg


def _disk(r: int):
    y, x = np.mgrid[-r: r + 1, -r: r + 1]
    return x * x + y * y <= r * r + 0.5


def _grown(seg, lab: int, sl, *, dilate: float, dilate_scale: float):
    """Segment ``lab`` (bounding slices ``sl``) dilated by ``dilate + dilate_scale·sqrt(area/π)``
    px: ((y0, y1, x0, x1), the dilated segment in that box)."""
    from scipy import ndimage

    ny, nx = seg.shape
    own = seg[sl] == lab
    r = int(round(dilate + dilate_scale * math.sqrt(own.sum() / math.pi)))
    y0, y1 = max(sl[0].start - r, 0), min(sl[0].stop + r, ny)
    x0, x1 = max(sl[1].start - r, 0), min(sl[1].stop + r, nx)
    box = seg[y0:y1, x0:x1] == lab
    if r > 0:
        box = ndimage.binary_dilation(box, structure=_disk(r))
    return (y0, y1, x0, x1), box


def _mask_others(seg, target: int | None, *, dilate: float, dilate_scale: float):
    """Other sources' segments, each dilated by ``dilate + dilate_scale·sqrt(area/π)`` px,
    not into the target's segment (``target=None``: every segment of ``seg``, unclipped)."""
    from scipy import ndimage

    out = np.zeros(seg.shape, bool)
    for lab, sl in zip(range(1, int(seg.max()) + 1), ndimage.find_objects(seg)):
        if sl is None or lab == target:
            continue
        (y0, y1, x0, x1), box = _grown(seg, lab, sl, dilate=dilate, dilate_scale=dilate_scale)
        out[y0:y1, x0:x1] |= box
    return out if target is None else out & (seg != target)


#: Largest residual source the residual pass masks, as a fraction of the target segment's area
#: (larger residuals are the target's own structure: arms, bars, a mis-modelled profile).
RESIDUAL_MAX_AREA = 0.15


def _elliptical_median(data, bad, xc, yc, pa, q, *, rms=None):
    """Smooth model of a source: the median of the usable pixels in elliptical annuli
    (width max(1 px, 10 % of the radius)), interpolated in elliptical radius. With ``rms``
    the model ends (is 0 beyond) at the first annulus whose median is not above twice its
    standard error (1.25·rms/√pixels): the source's detectable extent."""
    ny, nx = data.shape
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    r = _ellipse_r(x, y, xc, yc, pa, q)
    edges = [0.0, 0.5]
    while edges[-1] <= r.max():
        edges.append(edges[-1] + max(1.0, 0.1 * edges[-1]))
    idx = np.digitize(r, edges) - 1
    centre, level = [], []
    for k in range(len(edges) - 1):
        sel = ~bad & (idx == k)
        n_sel = int(sel.sum())
        if n_sel >= 5:
            centre.append(float(np.median(r[sel])))
            level.append(float(np.median(data[sel])))
            if rms is not None and level[-1] < 2.0 * 1.25 * rms / math.sqrt(n_sel):
                level[-1] = 0.0
                break
    if len(centre) < 2:
        return np.zeros_like(data)
    return np.interp(r, centre, level, right=0.0 if rms is not None else level[-1])


def residual_sources(data, segmap, target: int, est: dict, *, mask, rms: float, fwhm: float,
                     n_sigma: float = 1.5, n_pixels: int = 5, dilate: float = 2.0, dilate_scale: float = 0.3):
    """Companions left inside the target's segment, found on the residual of a smooth model.

    Parameters
    ----------
    data : 2-D array
        Background-subtracted image.
    segmap, target
        Segmentation map and the target's label.
    est : dict
        The target's estimates (``xc, yc, pa, q, r50``; :func:`measure_target`).
    mask : 2-D bool array
        Pixels already masked (other sources, bad pixels).
    rms, fwhm, n_sigma, n_pixels, dilate, dilate_scale
        As for the detection and the mask (:func:`detect`, :func:`analyse_cutout`).

    Returns
    -------
    (extra, count): the pixels to mask as well (dilated residual sources, never within
    ``max(2·r50, 3·fwhm)`` of the target's centre) and how many sources they are.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    resid = data - _elliptical_median(data, mask, est["xc"], est["yc"], est["pa"], est["q"])
    seg = detect(resid, rms=rms, fwhm=fwhm, mask=mask, n_sigma=n_sigma, n_pixels=n_pixels, deblend=False)
    extra = np.zeros(data.shape, bool)
    if seg is None:
        return extra, 0
    ny, nx = data.shape
    y, x = np.mgrid[:ny, :nx]
    own_target = segmap == target
    r_min = max(2.0 * est["r50"], 3.0 * fwhm)
    centre = np.hypot(x - est["xc"], y - est["yc"]) < r_min
    labels = np.asarray(seg.data)
    chosen = []
    for lab, sl in zip(range(1, int(labels.max()) + 1), ndimage.find_objects(labels)):
        if sl is None:
            continue
        own = labels == lab
        if not (own & own_target).any() or own.sum() > RESIDUAL_MAX_AREA * own_target.sum():
            continue
        w = np.where(own, np.maximum(resid, 0.0), 0.0)
        if w.sum() <= 0:
            continue
        cx, cy = float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())
        if math.hypot(cx - est["xc"], cy - est["yc"]) >= r_min:
            chosen.append(lab)
    if not chosen:
        return extra, 0
    # grown like every other source's mask (one radius rule: _mask_others)
    extra = _mask_others(np.where(np.isin(labels, chosen), labels, 0), None, dilate=dilate,
                         dilate_scale=dilate_scale)
    return extra & ~centre, len(chosen)


#: A neighbour's dilated segment is cut back (:func:`outshine_masks`) where the target's model
#: is brighter than the neighbour's and either the neighbour's model still reaches there or
#: the target is brighter than this many background rms per pixel. Beyond the neighbour's
#: measured extent, on the faint outskirts of the target, the dilated segment stays: its
#: undetected wings may carry more light than the little target light it covers.
OUTSHINE_FLOOR = 0.5


def outshine_masks(data, segmap, target: int, est: dict, *, mask, bad, rms: float, fwhm: float,
                   dilate: float = 2.0, dilate_scale: float = 0.3):
    """The other sources' masks, cut and grown to where each source outshines the target.

    A dilated segment (:func:`_mask_others`) is a guess at a source's extent: it misses the
    faint wings of an extended neighbour and, on the wings of a bright target, it also
    covers the target's light. Here the target and every other source get a smooth model
    (medians in elliptical annuli, ending where an annulus is no longer detected): the
    target's from the image with the other sources masked, each neighbour's from the image
    less the target's model, about the neighbour's own centre and second moments. A
    neighbour's mask is then its segment, plus its dilated segment except where the target's
    model is the brighter one (and the neighbour's model reaches there or the target is above
    :data:`OUTSHINE_FLOOR` rms), plus every pixel where the neighbour's model is brighter than
    the target's.

    Parameters
    ----------
    data : 2-D array
        Background-subtracted image.
    segmap, target
        Segmentation map and the target's label.
    est : dict
        The target's estimates (``xc, yc, pa, q, r50``; :func:`measure_target`).
    mask : 2-D bool array
        The mask so far (dilated other sources, bad pixels, residual companions): the
        pixels the target's model does not use.
    bad : 2-D bool array
        Bad pixels (never used for any model).
    rms, fwhm, dilate, dilate_scale
        As for the detection and the mask (:func:`detect`, :func:`analyse_cutout`).

    Returns
    -------
    2-D bool array: the other sources' mask (never on the target's segment).
    """
    from scipy import ndimage

    ny, nx = data.shape
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    mask, bad = np.asarray(mask, bool), np.asarray(bad, bool)
    t_model = np.clip(_elliptical_median(data, mask, est["xc"], est["yc"], est["pa"], est["q"], rms=rms), 0, None)
    core = _ellipse_r(x, y, est["xc"], est["yc"], est["pa"], est["q"]) < max(est["r50"], 2.0 * fwhm)
    rest = data - t_model
    grown = {}
    for lab, sl in zip(range(1, int(segmap.max()) + 1), ndimage.find_objects(segmap)):
        if sl is not None and lab != target:
            grown[lab] = (sl,) + _grown(segmap, lab, sl, dilate=dilate, dilate_scale=dilate_scale)
    out = np.zeros(data.shape, bool)
    for lab, (sl, (y0, y1, x0, x1), box) in grown.items():
        # the neighbour's model: within a box grown by twice its size plus 3 FWHM (and
        # holding its dilated segment), the target's core and the other neighbours' dilated
        # segments left out
        r_eq = math.sqrt((segmap[sl] == lab).sum() / math.pi)
        g = int(math.ceil(2.0 * r_eq + 3.0 * fwhm))
        by0, by1 = min(max(sl[0].start - g, 0), y0), max(min(sl[0].stop + g, ny), y1)
        bx0, bx1 = min(max(sl[1].start - g, 0), x0), max(min(sl[1].stop + g, nx), x1)
        win = (slice(by0, by1), slice(bx0, bx1))
        own = segmap[win] == lab
        skip = bad[win] | core[win]
        for other, (_, (oy0, oy1, ox0, ox1), obox) in grown.items():
            if other != lab:
                ys, xs = slice(max(oy0, by0), min(oy1, by1)), slice(max(ox0, bx0), min(ox1, bx1))
                if ys.start < ys.stop and xs.start < xs.stop:
                    skip[ys.start - by0: ys.stop - by0, xs.start - bx0: xs.stop - bx0] |= \
                        obox[ys.start - oy0: ys.stop - oy0, xs.start - ox0: xs.stop - ox0]
        w = np.where(own, np.clip(rest[win], 0, None), 0.0)
        if not w.sum() > 0:
            out[win] |= own
            continue
        cx, cy, evals, _, theta = _light_moments(w, x[win], y[win])
        q = float(np.clip(math.sqrt(max(evals[0], 1e-6) / max(evals[1], 1e-6)), 0.2, 1.0))
        pa = theta - 90.0
        n_model = np.clip(_elliptical_median(rest[win], skip, cx - bx0, cy - by0, pa, q, rms=rms), 0, None)
        t_win = t_model[win]
        dilated = np.zeros(own.shape, bool)
        dilated[y0 - by0: y1 - by0, x0 - bx0: x1 - bx0] = box
        cut = (t_win > n_model) & ((n_model > 0) | (t_win > OUTSHINE_FLOOR * rms))
        out[win] |= own | (dilated & ~cut) | (n_model > t_win)
    return out & (segmap != target)


def _pick_target(seg, x, y, max_offset):
    ny, nx = seg.shape
    i, j = int(round(y)), int(round(x))
    if 0 <= i < ny and 0 <= j < nx and seg[i, j] > 0:
        return int(seg[i, j]), 0.0
    rows, cols = np.nonzero(seg > 0)
    if not len(rows):
        return 0, float("inf")
    d = np.hypot(cols - x, rows - y)
    k = int(np.argmin(d))
    return (int(seg[rows[k], cols[k]]), float(d[k])) if d[k] <= max_offset else (0, float(d[k]))


# --------------------------------------------------------------------------- estimates
def _light_moments(w, x, y):
    """First and second moments of the light ``w`` (total > 0) on the grid ``x, y``:
    ``(xc, yc, evals, evecs, theta)``, the covariance's eigenvalues (ascending) and vectors,
    and ``theta`` the major axis' angle from +x in degrees."""
    tot = w.sum()
    xc, yc = (w * x).sum() / tot, (w * y).sum() / tot
    dx, dy = x - xc, y - yc
    cov = np.array([[(w * dx * dx).sum(), (w * dx * dy).sum()], [(w * dx * dy).sum(), (w * dy * dy).sum()]]) / tot
    evals, evecs = np.linalg.eigh(cov)
    return xc, yc, evals, evecs, math.degrees(math.atan2(evecs[1, 1], evecs[0, 1]))


def _ellipse_r(x, y, xc, yc, pa, q):
    th = math.radians(pa + 90.0)
    dx, dy = x - xc, y - yc
    xm = dx * math.cos(th) + dy * math.sin(th)
    ym = -dx * math.sin(th) + dy * math.cos(th)
    return np.hypot(xm, ym / q)


def _reflect_fill(d, bad, xc, yc):
    """Masked pixels replaced by their point-reflection through (xc, yc) when that one is
    usable, else 0 (the background)."""
    ny, nx = d.shape
    rows, cols = np.nonzero(bad)
    ri = np.rint(2 * yc - rows).astype(int)
    ci = np.rint(2 * xc - cols).astype(int)
    ok = (ri >= 0) & (ri < ny) & (ci >= 0) & (ci < nx)
    ok[ok] &= ~bad[ri[ok], ci[ok]]
    out = np.where(bad, 0.0, d)
    out[rows[ok], cols[ok]] = d[ri[ok], ci[ok]]
    return out


def _sersic_cog(r, n, re):
    from scipy.special import gammainc, gammaincinv

    b = gammaincinv(2 * n, 0.5)
    return gammainc(2 * n, b * (np.maximum(r, 0) / re) ** (1.0 / n))


def _fit_cog(edges, flux, err, f0, re0):
    """(F, re, n) of a Sérsic curve of growth fitted to elliptical annulus fluxes."""
    from scipy.optimize import least_squares

    use = err > 0
    if use.sum() < 4:
        return None

    def resid(p):
        F, re, n = math.exp(p[0]), math.exp(p[1]), math.exp(p[2])
        cog = _sersic_cog(edges, n, re)
        return ((F * np.diff(cog) - flux) / np.where(use, err, 1.0))[use]

    lo = [math.log(max(f0, 1e-30)) - 3.0, math.log(0.1), math.log(0.3)]
    hi = [math.log(max(f0, 1e-30)) + 3.0, math.log(max(10 * edges[-1], 1.0)), math.log(8.0)]
    best = None
    for n0 in (1.0, 2.5, 4.0):
        p0 = np.clip([math.log(max(f0, 1e-30)), math.log(max(re0, 0.2)), math.log(n0)], np.add(lo, 1e-6),
                     np.subtract(hi, 1e-6))
        try:
            res = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac")
        except (ValueError, FloatingPointError):
            continue
        if best is None or res.cost < best.cost:
            best = res
    if best is None or not np.all(np.isfinite(best.x)):
        return None
    return tuple(math.exp(v) for v in best.x)


def measure_target(data, seg, target: int, *, sigma, mask, psf=None, zp: float = _DEFAULT_ZP):
    """Starting values of a single Sérsic from the target's light (see the module doc).

    Parameters
    ----------
    data : 2-D array
        Background-subtracted image.
    seg : 2-D int array
        Segmentation map; ``target`` is the target's label.
    sigma : 2-D array
        1σ map (weights of the curve-of-growth fit).
    mask : 2-D bool array
        Pixels not to use (other sources, bad pixels).
    psf : 2-D array, optional
        PSF image (moments and half-light radius removed from the estimates).
    zp : float
        Magnitude zero point.

    Returns
    -------
    dict
        ``xc, yc, pa, q, re, mag, n`` plus ``flux``, ``re_obs`` (before the PSF correction),
        ``r50``, ``r90`` and ``concentration`` (``r90/r50`` of the measured light).
    """
    ny, nx = data.shape
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    own = seg == target
    w = np.where(own & ~mask, np.clip(data, 0, None), 0.0)
    if not w.sum() > 0:
        raise InputError("the target's segment holds no positive flux", what="detection")
    # moments of the segment's light → centre and shape (PSF moments removed)
    xc, yc, evals, _, theta = _light_moments(w, x, y)
    s2psf = (psf_fwhm(psf) / 2.3548) ** 2
    lam = np.maximum(evals - s2psf, 0.1 * evals)
    q = float(np.clip(math.sqrt(max(lam[0], 1e-6) / max(lam[1], 1e-6)), 0.1, 1.0))
    pa = wrap_angle(theta - 90.0)                                    # from +y, in [-90, 90)
    # windowed centroid of the filled image
    radius = max(2.0 * psf_fwhm(psf), 0.5 * math.sqrt(own.sum() / math.pi), 3.0)
    filled = _reflect_fill(data, mask, xc, yc)
    for _ in range(5):
        win = (np.hypot(x - xc, y - yc) <= radius) & (filled > 0)
        ww = np.where(win, filled, 0.0)
        if not ww.sum() > 0:
            break
        nxc, nyc = (ww * x).sum() / ww.sum(), (ww * y).sum() / ww.sum()
        done = math.hypot(nxc - xc, nyc - yc) < 0.01
        xc, yc = nxc, nyc
        filled = _reflect_fill(data, mask, xc, yc)
        if done:
            break
    # curve of growth in elliptical annuli, out to the largest ellipse inside the cutout
    r = _ellipse_r(x, y, xc, yc, pa, q)
    border = np.concatenate([r[0], r[-1], r[:, 0], r[:, -1]])
    rmax = float(border.min())
    if rmax < 3.0:
        raise InputError(f"the target's centre ({xc:.1f}, {yc:.1f}) is within 3 px of the cutout edge",
                         what="detection")
    # annuli 1 px wide out to 6 px, then 12% wider each (at least 1 px)
    edges = [0.0]
    while edges[-1] < rmax:
        edges.append(min(edges[-1] + max(1.0, 0.12 * edges[-1]) if edges[-1] >= 6 else edges[-1] + 1.0, rmax))
    edges = np.asarray(edges)
    idx = np.digitize(r.ravel(), edges) - 1
    inside = (idx >= 0) & (idx < len(edges) - 1)
    flux = np.bincount(idx[inside], weights=filled.ravel()[inside], minlength=len(edges) - 1)
    var = np.bincount(idx[inside], weights=(np.nan_to_num(sigma, posinf=0.0) ** 2).ravel()[inside],
                      minlength=len(edges) - 1)
    err = np.sqrt(var)
    cum = np.cumsum(flux)
    f_in = float(cum[-1])
    if not f_in > 0:
        raise InputError("no positive flux about the target", what="detection")

    def radius_at(frac):
        k = int(np.searchsorted(cum, frac * f_in))
        k = min(k, len(cum) - 1)
        lo_c = cum[k - 1] if k else 0.0
        t = (frac * f_in - lo_c) / max(cum[k] - lo_c, 1e-30)
        return float(edges[k] + np.clip(t, 0, 1) * (edges[k + 1] - edges[k]))

    r50, r90 = radius_at(0.5), radius_at(0.9)
    fit = _fit_cog(edges, flux, err, f_in, r50)
    if fit is None:
        F, re_obs, n = f_in, r50, 2.0
    else:
        F, re_obs, n = fit
    # quadrature PSF correction of the size (the curve of growth is of the convolved light)
    rp = psf_r50(psf)
    re = math.sqrt(max(re_obs**2 - rp**2, (0.3 * re_obs) ** 2))
    return {"xc": float(xc), "yc": float(yc), "pa": float(pa), "q": q, "re": float(np.clip(re, 0.5, 150.0)),
            "mag": float(zp - 2.5 * math.log10(F)), "n": float(np.clip(n, 0.5, 8.0)), "flux": float(F),
            "re_obs": float(re_obs), "r50": r50, "r90": r90, "concentration": r90 / max(r50, 1e-6)}


@dataclass
class CutoutAnalysis:
    """What :func:`analyse_cutout` found for one target."""

    estimates: dict                  # xc, yc, pa, q, re, mag, n (+ flux, r50, r90, ...)
    mask: np.ndarray                 # uint8, 1 = masked (other sources, bad pixels)
    segmap: np.ndarray               # int32 segmentation map (0 = background)
    target: int                      # the target's label in segmap
    sigma: np.ndarray | None         # estimated σ map (None when one was given)
    background: float
    rms: float
    fwhm: float
    notes: list = field(default_factory=list)


def analyse_cutout(image, *, sigma=None, psf=None, gain=None, zp: float = _DEFAULT_ZP, position=None,
                   max_offset=None, bad=None, n_sigma: float = 1.5, n_pixels: int = 5, contrast: float = 0.02,
                   dilate: float = 2.0, dilate_scale: float = 0.3, edge: float = 3.0, residual: bool = True,
                   outshine: bool = True, galaxy=None) -> CutoutAnalysis:
    """Detect, pick the target, mask the other sources and estimate its parameters.

    Parameters
    ----------
    image : 2-D array
        The cutout (not background-subtracted; a constant background is measured).
    sigma : 2-D array, optional
        1σ map; estimated with :func:`estimate_sigma` when None.
    psf : 2-D array, optional
        PSF image (detection kernel and PSF corrections; FWHM 3 px assumed without one).
    gain : float, optional
        Electrons per image unit, for the Poisson term of an estimated σ.
    zp : float
        Zero point of the magnitude.
    position : (x, y), optional
        Target position in 0-based pixels (default: the cutout centre).
    max_offset : float, optional
        Farthest a segment may be from ``position`` to be the target (default: a quarter of
        the cutout's smaller side without a position, else twice the PSF FWHM).
    bad : 2-D bool array, optional
        Pixels known to be bad (masked, never detected).
    n_sigma, n_pixels, contrast
        Detection settings (:func:`detect`).
    dilate, dilate_scale : float
        Growth of the other sources' segments: ``dilate + dilate_scale·sqrt(area/π)`` px.
    edge : float
        A target whose centre is within ``edge`` px of the cutout's border is refused.
    residual : bool
        Run the residual pass (:func:`residual_sources`): companions the deblending left in
        the target's segment are masked too, and the estimates measured again without them.
    outshine : bool
        Cut and grow the other sources' masks to where each outshines the target
        (:func:`outshine_masks`); the estimates are measured again with that mask.
    galaxy : str, optional
        Name used in error messages.

    Raises
    ------
    InputError
        Empty cutout, no source detected at the position, target on the edge.
    """
    image = np.asarray(image, dtype=np.float64)
    ny, nx = image.shape
    badpix = ~np.isfinite(image)
    if bad is not None:
        badpix |= np.asarray(bad, bool)
    if sigma is not None:
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.shape != image.shape:
            raise InputError(f"σ map shape {sigma.shape} differs from the image's {image.shape}",
                             galaxy=galaxy, what="sigma")
        badpix |= ~(np.isfinite(sigma) & (sigma > 0))
    good = image[~badpix]
    if good.size < 25 or np.ptp(good) == 0:
        raise InputError("empty cutout (no usable pixels or a constant image)", galaxy=galaxy, what="image")
    fwhm = psf_fwhm(psf)
    bkg, rms = estimate_background(image, mask=badpix, fwhm=fwhm)
    if not (np.isfinite(rms) and rms > 0):
        raise InputError("empty cutout (zero background rms)", galaxy=galaxy, what="image")
    notes = []
    est_sigma = None
    if sigma is None:
        est_sigma = estimate_sigma(image, gain=gain, background=(bkg, rms))
        sigma = est_sigma
        notes.append(f"sigma estimated from the image (background rms {rms:.4g}"
                     + (f", Poisson term with gain {gain:g})" if gain else ", no gain: no Poisson term)"))
    data = image - bkg
    seg = detect(data, rms=rms, fwhm=fwhm, mask=badpix, n_sigma=n_sigma, n_pixels=n_pixels, contrast=contrast)
    px, py = ((nx - 1) / 2.0, (ny - 1) / 2.0) if position is None else (float(position[0]), float(position[1]))
    if max_offset is None:
        max_offset = 0.25 * min(nx, ny) if position is None else 2.0 * fwhm
    if seg is None:
        raise InputError("no source detected in the cutout", galaxy=galaxy, what="detection")
    segmap = np.asarray(seg.data, dtype=np.int32)
    target, dist = _pick_target(segmap, px, py, max_offset)
    if not target:
        raise InputError(f"no source detected within {max_offset:.1f} px of ({px:.1f}, {py:.1f}) "
                         f"(nearest segment at {dist:.1f} px)", galaxy=galaxy, what="detection")
    others = _mask_others(segmap, target, dilate=dilate, dilate_scale=dilate_scale)
    mask = others | badpix
    try:
        est = measure_target(data, segmap, target, sigma=sigma, mask=mask, psf=psf, zp=zp)
        extra = np.zeros(mask.shape, bool)
        if residual:
            extra, count = residual_sources(data, segmap, target, est, mask=mask, rms=rms, fwhm=fwhm,
                                            n_sigma=n_sigma, n_pixels=n_pixels, dilate=dilate,
                                            dilate_scale=dilate_scale)
            if count:
                mask = mask | extra
                est = measure_target(data, segmap, target, sigma=sigma, mask=mask, psf=psf, zp=zp)
                notes.append(f"{count} companion(s) on the target's light masked ({int(extra.sum())} px)")
        if outshine and len(np.unique(segmap)) > 2:
            others = outshine_masks(data, segmap, target, est, mask=mask, bad=badpix, rms=rms, fwhm=fwhm,
                                    dilate=dilate, dilate_scale=dilate_scale)
            mask = others | badpix | extra
            est = measure_target(data, segmap, target, sigma=sigma, mask=mask, psf=psf, zp=zp)
    except InputError as exc:
        raise InputError(exc.problem, galaxy=galaxy, what=exc.what) from None
    xc, yc = est["xc"], est["yc"]
    if min(xc, yc, nx - 1 - xc, ny - 1 - yc) < edge:
        raise InputError(f"target on the edge: centre ({xc:.1f}, {yc:.1f}) within {edge:g} px of the border of "
                         f"the {ny}x{nx} cutout", galaxy=galaxy, what="detection")
    if abs(bkg) > 0.5 * rms:
        notes.append(f"background {bkg:.4g} (rms {rms:.4g}) not subtracted from the image: use a recipe with sky")
    return CutoutAnalysis(estimates=est, mask=mask.astype(np.uint8), segmap=segmap, target=target,
                          sigma=est_sigma, background=bkg, rms=rms, fwhm=fwhm, notes=notes)


# --------------------------------------------------------------------------- bounds
#: The per-galaxy bounds columns :func:`data_bounds` fills (read by galbayes.catalog).
BOUND_COLUMNS = tuple(f"sersic_{p}_{s}" for p in ("xc", "yc", "re", "mag") for s in ("lo", "hi"))


def data_bounds(est: dict, *, centre: float = 3.0, re_factor: float = 3.0, mag: float = 1.0) -> dict:
    """Per-galaxy bounds centred on the estimates: centre ± ``centre`` px, ``re`` within a
    factor ``re_factor``, ``mag`` ± ``mag``. Keys ``sersic_<p>_lo`` / ``sersic_<p>_hi``."""
    return {"sersic_xc_lo": est["xc"] - centre, "sersic_xc_hi": est["xc"] + centre,
            "sersic_yc_lo": est["yc"] - centre, "sersic_yc_hi": est["yc"] + centre,
            "sersic_re_lo": est["re"] / re_factor, "sersic_re_hi": est["re"] * re_factor,
            "sersic_mag_lo": est["mag"] - mag, "sersic_mag_hi": est["mag"] + mag}


# --------------------------------------------------------------------------- files
def _read_image(path, *, galaxy=None, what="image"):
    """(2-D float64 array, header) of the first 2-D image HDU."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}", galaxy=galaxy, what=what)
    try:
        with fits.open(path, memmap=False) as hdul:
            for h in hdul:
                if h.data is not None and getattr(h.data, "ndim", 0) == 2:
                    return np.asarray(h.data, dtype=np.float64), h.header.copy()
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot read {path}: {exc}", galaxy=galaxy, what=what) from None
    raise InputError(f"no 2-D image HDU in {path}", galaxy=galaxy, what=what)


def _write(path, data, header=None):
    from astropy.io import fits

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fits.PrimaryHDU(data, header=header).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _header_float(header, keys):
    for k in keys:
        if header is not None and k in header:
            try:
                v = float(header[k])
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                return v
    return None


def _rel(path, base):
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base))


def _safe(gid: str) -> str:
    return "".join(c if (c.isalnum() or c in "+-._") else "_" for c in str(gid))


class _Writer:
    """Catalog, status and bounds rows, written at the end (atomically)."""

    def __init__(self, out, *, bounds: bool, settings: dict):
        self.out = Path(out)
        if self.out.suffix.lower() != ".csv":
            raise InputError(f"the catalog must be a .csv file, got {self.out}", what="--out")
        self.base = self.out.parent
        self.dir = self.base / f"{self.out.stem}_prep"
        self.bounds = bounds
        self.settings = settings
        self.rows, self.status = [], []

    def files(self, gid):
        s = _safe(gid)
        return {k: self.dir / f"{s}_{k}.fits" for k in ("image", "sigma", "mask", "seg")}

    def ok(self, gid, row: dict, an: CutoutAnalysis):
        e = an.estimates
        row.update({"sersic_xc": e["xc"], "sersic_yc": e["yc"], "sersic_pa": e["pa"], "sersic_q": e["q"],
                    "sersic_re": e["re"], "sersic_mag": e["mag"], "sersic_n": e["n"]})
        row["prepare_note"] = "; ".join(an.notes)
        self.rows.append(row)
        self.status.append({"id": gid, "status": OK, "note": row["prepare_note"]})
        if self.bounds:
            row.update(data_bounds(e))

    def fail(self, gid, exc):
        msg = str(exc) if isinstance(exc, InputError) and exc.galaxy is not None else f"galaxy {gid}: {exc}"
        self.status.append({"id": gid, "status": msg, "note": ""})

    def _csv(self, path, rows, cols):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({c: _fmt(r.get(c)) for c in cols})
        os.replace(tmp, path)

    def close(self, extra_cols=()):
        self.base.mkdir(parents=True, exist_ok=True)
        cols = ["id", "image", "sigma", "psf", "mask", "zp"]
        if any(r.get("pixel_scale") is not None for r in self.rows):
            cols.append("pixel_scale")
        cols += list(SERSIC_COLUMNS)
        if self.bounds:
            cols += list(BOUND_COLUMNS)
        cols += ["segmap"] + list(extra_cols) + ["prepare_note"]
        self._csv(self.out, self.rows, cols)
        self._csv(self.base / "prepare_status.csv", self.status, ["id", "status", "note"])
        import photutils

        info = dict(self.settings, photutils=photutils.__version__, catalog=self.out.name,
                    n_targets=len(self.status), n_ok=len(self.rows),
                    data_bounds=("catalog columns " + ", ".join(BOUND_COLUMNS) + ": centre ± 3 px, re within "
                                 "×/÷ 3, mag ± 1 of the estimates; galbayes fit uses them as these "
                                 "galaxies' bounds (uniform priors)")
                    if self.bounds else None)
        (self.base / "prepare.json").write_text(json.dumps(info, indent=2) + "\n")
        return self.out


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.10g}"           # ra/dec to ~1e-8 deg
    return v


# --------------------------------------------------------------------------- drivers
def _find_beside(image: Path, suffix: str, *, image_suffix: str, pattern: str | None = None):
    stem = image.name
    for ext in (".fits.gz", ".fits", ".fit", ".fts"):
        if stem.lower().endswith(ext):
            stem, ext_ = stem[: -len(ext)], stem[-len(ext):]
            break
    else:
        stem, ext_ = image.stem, image.suffix
    base = stem[: -len(image_suffix)] if image_suffix and stem.endswith(image_suffix) else stem
    if pattern:
        return image.parent / pattern.format(stem=stem, name=base, ext=ext_), base
    return image.parent / f"{base}{suffix}{ext_}", base


def prepare_cutouts(*, images, out, psf=None, sigma_suffix: str = "_sigma", image_suffix: str = "_image",
                    sigma_pattern: str | None = None, psf_suffix: str = "_psf", gain=None, zp=None,
                    pixel_scale=None, data_bounds: bool = False, n_sigma: float = 1.5, n_pixels: int = 5,
                    contrast: float = 0.02, dilate: float = 2.0, dilate_scale: float = 0.3,
                    progress=None) -> Path:
    """Prepare existing cutouts (one target at each cutout's centre) for ``galbayes fit``.

    Parameters
    ----------
    images : list of path
        Cutout FITS files.
    out : path
        Catalog to write (``.csv``); masks etc. go to ``<stem>_prep/`` beside it.
    psf : path, optional
        PSF for every cutout; else ``<name><psf_suffix>.fits`` beside each image.
    sigma_suffix, image_suffix : str
        The σ map beside ``<name><image_suffix>.fits`` is ``<name><sigma_suffix>.fits``
        (``J1_image.fits`` → ``J1_sigma.fits``); the id is ``<name>``.
    sigma_pattern : str, optional
        Instead: a pattern with ``{name}`` (stem without the image suffix), ``{stem}`` and
        ``{ext}``, e.g. ``"{name}.rms{ext}"``. A σ map not found is estimated
        (:func:`estimate_sigma`) and written to ``<stem>_prep/<id>_sigma.fits``.
    gain, zp : float, optional
        Override the header's ``GAIN`` and zero point (:data:`ZP_KEYWORDS`; default 22.5).
    pixel_scale : float, optional
        Written to the catalog's ``pixel_scale`` column.
    data_bounds : bool
        Also write per-galaxy bounds columns centred on the estimates (:func:`data_bounds`),
        which ``galbayes fit`` applies.
    n_sigma, n_pixels, contrast, dilate, dilate_scale
        Detection and mask settings (:func:`analyse_cutout`).
    progress : callable, optional
        Called with one line of text per target.

    Returns
    -------
    Path of the catalog written.
    """
    w = _Writer(out, bounds=data_bounds, settings=dict(
        mode="cutouts", n_sigma=n_sigma, n_pixels=n_pixels, contrast=contrast, dilate=dilate,
        dilate_scale=dilate_scale, residual_pass=True, outshine_masks=True, sigma_suffix=sigma_suffix, sigma_pattern=sigma_pattern,
        gain=gain, zp=zp))
    psf_arr = None
    if psf is not None:
        psf_arr, _ = _read_image(psf, what="PSF")
    seen = {}
    for img in images:
        img = Path(img)
        sig_path, gid = _find_beside(img, sigma_suffix, image_suffix=image_suffix, pattern=sigma_pattern)
        if gid in seen:
            seen[gid] += 1
            gid = f"{gid}_{seen[gid]}"
        seen.setdefault(gid, 0)
        try:
            data, header = _read_image(img, galaxy=gid)
            if psf is not None:
                p_path, p_arr = Path(psf), psf_arr
            else:
                p_path, _ = _find_beside(img, psf_suffix, image_suffix=image_suffix)
                if not p_path.is_file():
                    raise InputError(f"no PSF given and none beside the image ({p_path.name})", galaxy=gid,
                                     what="PSF")
                p_arr, _ = _read_image(p_path, galaxy=gid, what="PSF")
            sigma = None
            if sig_path.is_file():
                sigma, _ = _read_image(sig_path, galaxy=gid, what="sigma")
            g = gain if gain is not None else _header_float(header, ("GAIN",))
            z = zp if zp is not None else (_header_float(header, ZP_KEYWORDS) or _DEFAULT_ZP)
            an = analyse_cutout(data, sigma=sigma, psf=p_arr, gain=g, zp=z, galaxy=gid, n_sigma=n_sigma,
                                n_pixels=n_pixels, contrast=contrast, dilate=dilate, dilate_scale=dilate_scale)
            f = w.files(gid)
            _write(f["mask"], an.mask)
            _write(f["seg"], an.segmap)
            if an.sigma is not None:
                _write(f["sigma"], an.sigma.astype(np.float32))
                sig_path = f["sigma"]
                an.notes[0] += f", written to {_rel(sig_path, w.base)}"
            w.ok(gid, {"id": gid, "image": _rel(img, w.base), "sigma": _rel(sig_path, w.base),
                       "psf": _rel(p_path, w.base), "mask": _rel(f["mask"], w.base), "zp": z,
                       "pixel_scale": pixel_scale, "segmap": _rel(f["seg"], w.base)}, an)
            if progress:
                progress(f"{gid}: ok")
        except InputError as exc:
            w.fail(gid, exc)
            if progress:
                progress(f"{gid}: {exc}")
    return w.close()


def _read_positions(path):
    from astropy.table import Table

    try:
        t = Table.read(path, format="ascii.csv")
    except Exception as exc:  # noqa: BLE001 (astropy's readers raise many types)
        raise InputError(f"cannot read the positions file {path}: {exc}", what="positions") from None
    cols = {c.lower(): c for c in t.colnames}
    for need in ("ra", "dec"):
        if need not in cols:
            raise InputError(f"the positions file {path} has no {need!r} column (columns: {t.colnames})",
                             what="positions")
    rows = []
    for i, r in enumerate(t):
        gid = str(r[cols["id"]]).strip() if "id" in cols else f"obj{i:04d}"
        psf = None
        if "psf" in cols and not np.ma.is_masked(r[cols["psf"]]) and str(r[cols["psf"]]).strip():
            psf = str(r[cols["psf"]]).strip()

        def num(c):
            v = r[cols[c]]
            try:
                return float(v) if not np.ma.is_masked(v) else float("nan")
            except (TypeError, ValueError):
                return float("nan")
        rows.append({"id": gid, "ra": num("ra"), "dec": num("dec"), "psf": psf})
    return rows


def prepare_frame(*, image, positions, out, psf=None, sigma=None, gain=None, zp=None, pixel_scale=None,
                  data_bounds: bool = False, size_factor: float = 2.5, min_size: int = 32, max_size: int = 1024,
                  n_sigma: float = 1.5, n_pixels: int = 5, contrast: float = 0.02, dilate: float = 2.0,
                  dilate_scale: float = 0.3, progress=None) -> Path:
    """Cut and prepare the targets of a large image with a WCS at a list of RA/Dec positions.

    Parameters
    ----------
    image : path
        The frame (FITS, first 2-D HDU, with a celestial WCS in its header).
    positions : path
        CSV with ``ra``, ``dec`` (degrees, ICRS/the frame's system) and optional ``id`` and
        ``psf`` (a per-object PSF path relative to the positions file, overriding ``psf``).
    out : path
        Catalog to write (``.csv``); cutouts, σ maps, masks and segmentation maps go to
        ``<stem>_prep/``.
    psf : path, optional
        PSF of the frame.
    sigma : path, optional
        σ map of the frame (cut like the image); else estimated per cutout.
    gain, zp : float, optional
        Override the frame header's ``GAIN`` and zero point (default 22.5).
    pixel_scale : float, optional
        Arcsec per pixel for the catalog (default: from the WCS).
    data_bounds : bool
        Also write per-galaxy bounds columns (see :func:`prepare_cutouts`).
    size_factor, min_size, max_size
        Cutout side = ``size_factor`` × the target segment's largest extent (bounding box),
        at least ``min_size``, at most ``max_size`` pixels, rounded up to the stamp buckets
        (:func:`snap_shape`) and clipped to the frame.
    n_sigma, n_pixels, contrast, dilate, dilate_scale
        Detection and mask settings (:func:`analyse_cutout`).
    progress : callable, optional
        Called with one line of text per target.

    Returns
    -------
    Path of the catalog written.
    """
    from astropy.coordinates import SkyCoord
    from astropy.nddata import Cutout2D
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    w = _Writer(out, bounds=data_bounds, settings=dict(
        mode="frame", image=str(image), n_sigma=n_sigma, n_pixels=n_pixels, contrast=contrast, dilate=dilate,
        dilate_scale=dilate_scale, residual_pass=True, outshine_masks=True, size_factor=size_factor, min_size=min_size, gain=gain,
        zp=zp))
    targets = _read_positions(positions)
    pos_dir = Path(positions).parent
    frame_problem = None
    frame = header = wcs = sig_frame = None
    try:
        frame, header = _read_image(image, what="frame")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(header)
        if not wcs.has_celestial:
            raise InputError(f"{image} has no celestial WCS", what="frame")
        wcs = wcs.celestial
        if sigma is not None:
            sig_frame, _ = _read_image(sigma, what="frame sigma")
            if sig_frame.shape != frame.shape:
                raise InputError(f"σ map shape {sig_frame.shape} differs from the frame's {frame.shape}",
                                 what="frame sigma")
    except InputError as exc:
        frame_problem = exc.problem
    psfs = {}

    def load_psf(p):
        key = str(p)
        if key not in psfs:
            psfs[key] = _read_image(p, what="PSF")[0]
        return psfs[key]

    g = z = scale = None
    if frame_problem is None:
        g = gain if gain is not None else _header_float(header, ("GAIN",))
        z = zp if zp is not None else (_header_float(header, ZP_KEYWORDS) or _DEFAULT_ZP)
        scale = pixel_scale if pixel_scale is not None else float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)
    ny, nx = (0, 0) if frame is None else frame.shape
    seen = set()
    for t in targets:
        gid = t["id"]
        if gid in seen:
            gid = f"{gid}_{len(seen)}"
        seen.add(gid)
        try:
            if frame_problem is not None:
                raise InputError(frame_problem, galaxy=gid, what="frame")
            if not (math.isfinite(t["ra"]) and math.isfinite(t["dec"])):
                raise InputError("ra/dec missing or not a number", galaxy=gid, what="position")
            if t["psf"] is not None:
                p_path = Path(t["psf"]) if Path(t["psf"]).is_absolute() else pos_dir / t["psf"]
            elif psf is not None:
                p_path = Path(psf)
            else:
                raise InputError("no PSF: give --psf or a psf column", galaxy=gid, what="PSF")
            try:
                p_arr = load_psf(p_path)
            except InputError as exc:
                raise InputError(exc.problem, galaxy=gid, what="PSF") from None
            x, y = (float(v) for v in wcs.world_to_pixel(SkyCoord(t["ra"], t["dec"], unit="deg")))
            if not (math.isfinite(x) and math.isfinite(y)) or not (-0.5 <= x < nx - 0.5 and -0.5 <= y < ny - 0.5):
                raise InputError(f"position (x, y) = ({x:.1f}, {y:.1f}) is off the {ny}x{nx} image", galaxy=gid,
                                 what="position")
            kw = dict(psf=p_arr, gain=g, zp=z, galaxy=gid, n_sigma=n_sigma, n_pixels=n_pixels, contrast=contrast,
                      dilate=dilate, dilate_scale=dilate_scale)
            # size from a first look: a box grown until the target's segment lies inside it,
            # then the side from the segment's extent, snapped up to a stamp bucket
            side, final = snap_shape((max(min_size, 64),))[0], False
            for _ in range(8):
                cut = Cutout2D(frame, (x, y), (side, side), wcs=wcs, mode="trim", copy=True)
                cx, cy = cut.to_cutout_position((x, y))
                scut = None if sig_frame is None else sig_frame[cut.slices_original]
                an = analyse_cutout(cut.data, sigma=scut, position=(cx, cy), **kw)
                if final:
                    break
                rows, cols = np.nonzero(an.segmap == an.target)
                extent = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
                want = snap_shape((min(max(min_size, size_factor * extent), max_size),))[0]
                sy, sx = cut.slices_original
                h, wd = cut.data.shape
                touches = ((rows.min() == 0 and sy.start > 0) or (cols.min() == 0 and sx.start > 0)
                           or (rows.max() == h - 1 and sy.stop < ny) or (cols.max() == wd - 1 and sx.stop < nx))
                if touches and side < max_size:
                    side = snap_shape((min(2 * side, max_size),))[0]
                    continue
                if want == side:
                    break
                side, final = want, True
            f = w.files(gid)
            hdr = cut.wcs.to_header()
            _write(f["image"], cut.data.astype(np.float32), hdr)
            if an.sigma is not None:
                _write(f["sigma"], an.sigma.astype(np.float32), hdr)
                an.notes[0] += f", written to {_rel(f['sigma'], w.base)}"
            else:
                _write(f["sigma"], scut.astype(np.float32), hdr)
            _write(f["mask"], an.mask, hdr)
            _write(f["seg"], an.segmap, hdr)
            (x0, y0) = cut.origin_original
            if cut.data.shape != (side, side):
                an.notes.append(f"cutout clipped by the image edge to {cut.data.shape[0]}x{cut.data.shape[1]}")
            w.ok(gid, {"id": gid, "image": _rel(f["image"], w.base), "sigma": _rel(f["sigma"], w.base),
                       "psf": _rel(p_path, w.base), "mask": _rel(f["mask"], w.base), "zp": z,
                       "pixel_scale": scale, "segmap": _rel(f["seg"], w.base), "ra": t["ra"], "dec": t["dec"],
                       "x_frame": x, "y_frame": y, "x0_frame": int(x0), "y0_frame": int(y0)}, an)
            if progress:
                progress(f"{gid}: ok ({cut.data.shape[0]}x{cut.data.shape[1]})")
        except InputError as exc:
            w.fail(gid, exc)
            if progress:
                progress(f"{gid}: {exc}")
    return w.close(extra_cols=("ra", "dec", "x_frame", "y_frame", "x0_frame", "y0_frame"))

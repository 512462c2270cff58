"""Batching rules in one place: compiled batch sizes and stamp-shape buckets.

* :func:`slot_count`: a partial batch of ``n`` galaxies is run with the next power of two
  (≤ the batch size) slots, so that a run compiles few distinct batch shapes.
* :func:`pad_rows`: pad a pytree along its leading axis to a compiled size by repeating its
  last entry (the padding is dropped from the results).
* :func:`group_by_shape`: galaxies that share (stamp, PSF) shapes are fitted together.
* :func:`bucket_groups`: the groups of a fit, one per bucket; a group too small to fill
  one batch joins the bucket in use with the smallest canvas that holds it, instead of
  compiling (or loading) a program of its own.
* Buckets: every stamp and PSF size is rounded up to one of a few canonical sizes
  (:data:`BUCKET_SIZES`, ×1 or ×1.5 a power of two, so at most 1.5× per axis;
  :data:`PSF_BUCKET_SIZES` for PSFs), so that a
  catalog of arbitrary sizes compiles a handful of programs. :func:`to_bucket` pads a packed
  galaxy: the stamp at the END of each axis with pixels of weight 0, σ 1 and image 0 (they
  never enter χ²), the PSF with zeros around it such that its centre pixel under the
  ``(k-1)//2`` convention stays the centre (symmetric when the sizes have the same parity),
  and the convolution kernels FFT'd again on the bucket's grid from the galaxy's own
  kernels (so a pixel-deconvolved kernel is the one of the real PSF image). The real stamp's
  centre stays in ``GalaxyArrays.centre`` (tilted sky); bounds and starting values were set
  from the real stamp at pack time. A fit in a bucket equals the fit at the galaxy's own
  size to float32 rounding (``tests/test_batching.py``), except that the oversampled
  central boxes of a profile centred within a few pixels of the stamp's far edge are
  clipped to the bucket's larger canvas instead of the galaxy's own.
"""
from __future__ import annotations

import jax
import numpy as np

__all__ = ["slot_count", "pad_rows", "group_by_shape", "bucket_groups", "BUCKET_SIZES", "PSF_BUCKET_SIZES", "bucket_size",
           "bucket_shapes", "to_bucket", "bucketed"]

#: Canonical sizes of a stamp axis: 2^k and 1.5·2^k from 4 (up to 2^16).
BUCKET_SIZES = tuple(sorted({int(b * 2 ** k) for k in range(2, 17) for b in (1.0, 1.5)}))
#: Canonical sizes of a PSF axis: 2^k·(1, 1.25, 1.5, 1.75) + 1 (odd: 9, 11, 13, 15, 17, 21,
#: ..., 33, 41, 49, 57, 65, ...); a finer ladder, as the PSF's half-size pads the canvas.
PSF_BUCKET_SIZES = tuple(sorted({int(b * 2 ** k) + 1 for k in range(2, 14) for b in (1.0, 1.25, 1.5, 1.75)}))


def slot_count(n: int, batch_size: int) -> int:
    """Slots (compiled batch size) for ``n`` galaxies with batches of ``batch_size``: the
    next power of two ≥ n, at most ``batch_size`` (and at least 1)."""
    n, batch_size = max(int(n), 1), max(int(batch_size), 1)
    size = 1
    while size < n:
        size *= 2
    return min(size, batch_size)


def pad_rows(tree, size: int):
    """Pad every leaf along axis 0 to ``size`` by repeating its last entry (numpy)."""
    def pad(x):
        x = np.asarray(x)
        extra = size - x.shape[0]
        if extra <= 0:
            return x
        return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)], axis=0)
    return jax.tree_util.tree_map(pad, tree)


def _grouped(packed, key) -> dict:
    """``{key(gal): [(gid, gal), ...]}`` in order of first appearance."""
    groups: dict = {}
    for gid, gal in packed:
        groups.setdefault(key(gal), []).append((gid, gal))
    return groups


def _bucket_key(gal):
    return bucket_shapes(np.shape(gal.image), np.shape(gal.psf))


def group_by_shape(packed, buckets: bool = False):
    """``[(gid, GalaxyArrays)]`` → lists of the items that share (image, PSF) shapes — or,
    with ``buckets``, bucket shapes (:func:`bucket_shapes`) — in order of first appearance
    (each list is fitted through one compiled program)."""
    def shapes(gal):
        return tuple(np.shape(gal.image)), tuple(np.shape(gal.psf))
    return list(_grouped(packed, _bucket_key if buckets else shapes).values())


def bucket_groups(packed, *, min_group: int = 1):
    """``[(gid, GalaxyArrays)]`` → ``[((stamp shape, PSF shape), items)]``: the galaxies of
    each (stamp, PSF) bucket (:func:`bucket_shapes`), in order of first appearance, each
    group to be padded to its key (:func:`to_bucket`) and fitted through one program.

    A group of fewer than ``min_group`` galaxies (the batch size: it would fill no batch and
    compile, or load, a program of its own for a few galaxies) joins the other group whose
    stamp and PSF buckets are at least as large on every axis and whose canvas (stamp + PSF)
    is the smallest, if there is one. Smaller groups go first, so a chain of small groups
    ends in a group that can hold them.
    The galaxies moved are padded further (zero-weight pixels, zeros around the PSF): their
    fits are the same to float32 rounding.
    """
    groups = _grouped(packed, _bucket_key)
    min_group = int(min_group)

    def extent(key):
        return tuple(key[0]) + tuple(key[1])

    def pixels(key):             # ~ the padded canvas (stamp + the PSF's half-size each side)
        (ny, nx), (ky, kx) = key
        return ((ny + ky - 1) * (nx + kx - 1), ny * nx)

    for key in sorted(groups, key=pixels):
        if len(groups[key]) >= min_group:
            continue
        hosts = [k for k in groups if k != key and all(a >= b for a, b in zip(extent(k), extent(key)))]
        if hosts:
            host = min(hosts, key=pixels)
            groups[host].extend(groups.pop(key))
    return list(groups.items())


def bucket_size(n: int, sizes=BUCKET_SIZES) -> int:
    """The smallest canonical size ≥ ``n`` (``n`` itself beyond the largest)."""
    n = int(n)
    for s in sizes:
        if s >= n:
            return int(s)
    return n


def bucket_shapes(image_shape, psf_shape, sizes=BUCKET_SIZES, psf_sizes=PSF_BUCKET_SIZES):
    """(bucket stamp shape, bucket PSF shape) of a galaxy: each axis rounded up to
    ``sizes`` (stamp) and ``psf_sizes`` (PSF; odd, so an odd PSF is padded symmetrically)."""
    img = tuple(bucket_size(n, sizes) for n in image_shape)
    psf = tuple(bucket_size(k, psf_sizes) if k > 1 else 1 for k in psf_shape)
    return img, psf


def _psf_pads(k: int, K: int):
    """(before, after) zeros taking a PSF axis of size k to K with its centre pixel
    (k-1)//2 landing on (K-1)//2."""
    before = (K - 1) // 2 - (k - 1) // 2
    return before, K - k - before


def _refft(hat, fshape, frame, pads, new_fshape):
    """A kernel's zero-padded rfft2 on a new grid: the kernel (``frame`` at the origin of the
    old FFT grid ``fshape``) recovered, padded by ``pads`` and transformed again."""
    real = np.fft.irfft2(np.asarray(hat, np.complex128), s=fshape)[: frame[0], : frame[1]]
    real = np.pad(real, pads)
    return np.fft.rfft2(real, s=new_fshape).astype(np.complex64)


def to_bucket(gal, image_shape, psf_shape):
    """A packed galaxy (:class:`~galbayes.model.GalaxyArrays`, numpy leaves) padded to the
    stamp shape ``image_shape`` and PSF shape ``psf_shape`` (see the module docstring)."""
    from . import psf as psfmod

    ny, nx = np.shape(gal.image)
    ky, kx = np.shape(gal.psf)
    (Ny, Nx), (Ky, Kx) = tuple(image_shape), tuple(psf_shape)
    if (ny, nx, ky, kx) == (Ny, Nx, Ky, Kx):
        return gal
    if Ny < ny or Nx < nx or Ky < ky or Kx < kx:
        raise ValueError(f"bucket {image_shape}/{psf_shape} smaller than the galaxy's {(ny, nx)}/{(ky, kx)}")
    end = ((0, Ny - ny), (0, Nx - nx))
    pads = (_psf_pads(ky, Ky), _psf_pads(kx, Kx))
    new = {
        "image": np.pad(np.asarray(gal.image, np.float32), end),
        "sigma": np.pad(np.asarray(gal.sigma, np.float32), end, constant_values=1.0),
        "weight": np.pad(np.asarray(gal.weight, np.float32), end),
        "psf": np.pad(np.asarray(gal.psf, np.float32), pads),
    }
    if hasattr(psfmod, "canvas_fft_shape"):       # kernels of PSF + 2·DECONV_MARGIN on the canvas grid
        m = int(getattr(psfmod, "DECONV_MARGIN", 0))
        old_f = psfmod.canvas_fft_shape((ny, nx), (ky, kx))
        new_f = psfmod.canvas_fft_shape((Ny, Nx), (Ky, Kx))
        frame = (ky + 2 * m, kx + 2 * m)
    else:                                         # the PSF itself on the zero-padded grid
        old_f, new_f = psfmod.fft_shape((ny, nx), (ky, kx)), psfmod.fft_shape((Ny, Nx), (Ky, Kx))
        frame = (ky, kx)
    for name in ("psf_hat", "kernel_hat"):
        if name in gal._fields:
            new[name] = _refft(getattr(gal, name), old_f, frame, pads, new_f)
    if "psf_hat" in new and "kernel_hat" not in gal._fields:
        new["psf_hat"] = np.fft.rfft2(np.asarray(new["psf"], np.float64), s=new_f).astype(np.complex64)
    return gal._replace(**new)


def bucketed(packed, sizes=BUCKET_SIZES, psf_sizes=PSF_BUCKET_SIZES):
    """``[(gid, GalaxyArrays)]`` with every galaxy padded to its bucket (:func:`bucket_shapes`)."""
    out = []
    for gid, gal in packed:
        img, psf = bucket_shapes(np.shape(gal.image), np.shape(gal.psf), sizes, psf_sizes)
        out.append((gid, to_bucket(gal, img, psf)))
    return out

"""Pixel grids, the generalised-ellipse radius (boxiness) and sub-pixel oversampling.

Pixel ``(i, j)`` of an image ``[row, col]`` has its centre at ``x = j``, ``y = i`` (0-based,
astropy convention) and covers ``[j-½, j+½] × [i-½, i+½]``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax


class Grid(NamedTuple):
    """Coordinates at which a profile is evaluated.

    ``x`` and ``y`` have any (equal) shape; ``x0``, ``y0`` are the geometric centre of the
    whole image, ``((nx-1)/2, (ny-1)/2)``, for profiles defined about it (tilted sky).
    """

    x: jnp.ndarray
    y: jnp.ndarray
    x0: float
    y0: float


def pixel_grid(shape, *, margin=(0, 0), stamp_shape=None) -> Grid:
    """Pixel-centre coordinates of a ``shape`` array whose index 0 is at coordinate
    ``-margin`` (a canvas padded by ``margin = (rows, cols)`` before the stamp).

    ``x0``, ``y0`` are always the centre of the real stamp (``stamp_shape``, default
    ``shape``), never of the canvas or of a zero-padded bucket shape.
    """
    ny, nx = shape
    my, mx = margin
    sy, sx = shape if stamp_shape is None else stamp_shape
    y, x = jnp.meshgrid(jnp.arange(ny, dtype=jnp.float32) - my, jnp.arange(nx, dtype=jnp.float32) - mx,
                        indexing="ij")
    return Grid(x, y, (sx - 1) / 2.0, (sy - 1) / 2.0)


def _grid_origin(grid: Grid):
    """Coordinates ``(x, y)`` of array index ``(0, 0)`` of a :func:`pixel_grid` (static)."""
    return grid.x[0, 0], grid.y[0, 0]


def _safe_pow(base, expo):
    """``base**expo`` for base ≥ 0 with finite gradients at base = 0."""
    pos = base > 0
    safe = jnp.where(pos, base, 1.0)
    return jnp.where(pos, jnp.exp(expo * jnp.log(safe)), 0.0)


def ellipse_radius(grid: Grid, xc, yc, pa, q, box=0.0):
    """Generalised-ellipse radius along the major axis (paper eq. 2–4).

    ``θ = pa + 90°`` from +x; ``x_maj = dx cosθ + dy sinθ``, ``y_min = −dx sinθ + dy cosθ``;
    ``r = (|x_maj|^(B+2) + |y_min/q|^(B+2))^(1/(B+2))``. A Python ``0.0`` for ``box`` takes
    the exact elliptical (B = 0) path, which is cheaper.
    """
    theta = jnp.deg2rad(pa + 90.0)
    c, s = jnp.cos(theta), jnp.sin(theta)
    dx, dy = grid.x - xc, grid.y - yc
    xm = dx * c + dy * s
    ym = (-dx * s + dy * c) / q
    if isinstance(box, (int, float)) and box == 0:
        r2 = xm * xm + ym * ym
        pos = r2 > 0
        return jnp.where(pos, jnp.sqrt(jnp.where(pos, r2, 1.0)), 0.0)
    p = 2.0 + box
    return _safe_pow(_safe_pow(jnp.abs(xm), p) + _safe_pow(jnp.abs(ym), p), 1.0 / p)


def oversampled_box(fn, grid: Grid, xc, yc, *, size: int, factor: int, shape, origin=(0.0, 0.0)):
    """Evaluate ``fn(sub_grid)`` averaged over ``factor²`` sub-pixels in a ``size×size`` box.

    The box is centred on the pixel nearest ``(xc, yc)`` and kept inside the image, whose
    index ``(0, 0)`` is at coordinates ``origin = (x, y)``.
    Returns ``(block, row0, col0)``: the pixel-averaged block and its corner (array indices).
    """
    ny, nx = shape
    ox, oy = origin
    size_y, size_x = min(size, ny), min(size, nx)
    col0 = jnp.clip(jnp.round(xc - ox).astype(jnp.int32) - size_x // 2, 0, nx - size_x)
    row0 = jnp.clip(jnp.round(yc - oy).astype(jnp.int32) - size_y // 2, 0, ny - size_y)
    sub = (jnp.arange(factor, dtype=jnp.float32) + 0.5) / factor - 0.5
    xs = (jnp.arange(size_x, dtype=jnp.float32)[:, None] + sub[None, :]).reshape(-1)
    ys = (jnp.arange(size_y, dtype=jnp.float32)[:, None] + sub[None, :]).reshape(-1)
    yy, xx = jnp.meshgrid(ys + row0.astype(jnp.float32) + oy, xs + col0.astype(jnp.float32) + ox, indexing="ij")
    vals = fn(Grid(xx, yy, grid.x0, grid.y0))
    block = vals.reshape(size_y, factor, size_x, factor).mean(axis=(1, 3))
    return block, row0, col0


def pixel_average(samples):
    """Pixel-area means from pixel-centre samples: ``f + ∇²f / 24`` (second order).

    The discrete Laplacian uses edge-replicated neighbours at the image border.
    """
    # The neighbour sums are 3-wide window sums (zero outside the image) minus the centre;
    # at a border the missing neighbour is the centre itself (edge replication), so the
    # border rows / columns take one ``a`` back. Written with shifted copies instead, XLA on
    # the CPU fused the profile into each of them and evaluated it again per neighbour for
    # canvases ≤ 120²; with window sums it does not (an LM iteration at 64² 6.2 → 1.4 ms per
    # galaxy; benchmarks/README.md "bench_throughput").
    a = samples
    ny, nx = a.shape[-2:]
    ones = (1,) * (a.ndim - 2)
    zero = ((0, 0),) * (a.ndim - 2)
    col = lax.reduce_window(a, 0.0, lax.add, ones + (3, 1), ones + (1, 1), zero + ((1, 1), (0, 0)))
    row = lax.reduce_window(a, 0.0, lax.add, ones + (1, 3), ones + (1, 1), zero + ((0, 0), (1, 1)))
    ey = np.zeros((ny, 1), np.float32)
    ex = np.zeros((1, nx), np.float32)
    ey[0] = ey[-1] = 1.0
    ex[:, 0] = ex[:, -1] = 1.0
    return a + (col + row - (6.0 - ey - ex) * a) / 24.0


# Gauss-Legendre nodes on [0, 1] for the triangle-fan quadrature around a profile centre.
_FAN_T, _FAN_WT = np.polynomial.legendre.leggauss(12)
_FAN_U, _FAN_WU = np.polynomial.legendre.leggauss(16)
_FAN_T, _FAN_WT = 0.5 * (_FAN_T + 1.0), 0.5 * _FAN_WT
_FAN_U, _FAN_WU = 0.5 * (_FAN_U + 1.0), 0.5 * _FAN_WU
_FAN_POWER = 6  # radial clustering s = u^6: smooth integrand for cusps up to n ≈ 10


def _fan_nodes():
    """Nodes for integrating the square pixel [-½, ½]² in polar coordinates about an apex P.

    The pixel is the signed sum of the 4 triangles (P, A, B) over its counter-clockwise
    edges (A, B). Each triangle is integrated in polar angle φ about P (measured from the
    foot of the perpendicular from P to the edge) and radius r = L(φ) u^6, L = h / cos φ,
    so the integrand is smooth even when P is a cusp and when P lies next to the edge.
    Returns edge starts (4, 2), edge vectors (4, 2), the radial nodes u^6 (16, 1), the
    angular nodes t (12,) and the weights w_u·w_t·(r dr factor) (16, 12): the angular
    geometry (trigonometry) is computed once per angular node, not once per (u, t) pair.
    """
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    e = np.roll(corners, -1, axis=0) - corners
    u = np.broadcast_to(_FAN_U[:, None], (len(_FAN_U), len(_FAN_T)))
    wu, wt = np.meshgrid(_FAN_WU, _FAN_WT, indexing="ij")
    # r dr = L² u^p · p u^(p-1) du
    w = wu * wt * _FAN_POWER * u ** (2 * _FAN_POWER - 1)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return f32(corners), f32(e), f32(_FAN_U[:, None] ** _FAN_POWER), f32(_FAN_T), f32(w)


_FAN = _fan_nodes()


def fan_block(fn, grid: Grid, xc, yc, *, size: int, shape, origin=(0.0, 0.0)):
    """Pixel means of ``fn`` over a ``size×size`` block around ``(xc, yc)``, each pixel
    integrated in polar coordinates about the centre (exact for a cusp at the centre)."""
    ny, nx = shape
    ox, oy = origin
    size_y, size_x = min(size, ny), min(size, nx)
    col0 = jnp.clip(jnp.round(xc - ox).astype(jnp.int32) - size_x // 2, 0, nx - size_x)
    row0 = jnp.clip(jnp.round(yc - oy).astype(jnp.int32) - size_y // 2, 0, ny - size_y)
    a, e, s, t, w = _FAN
    pcy, pcx = jnp.meshgrid(jnp.arange(size_y, dtype=jnp.float32) + row0.astype(jnp.float32) + oy,
                            jnp.arange(size_x, dtype=jnp.float32) + col0.astype(jnp.float32) + ox, indexing="ij")
    px = (xc - pcx)[..., None, None, None]                # apex, pixel-centred: (sy, sx, 1, 1, 1)
    py = (yc - pcy)[..., None, None, None]
    ax, ay = a[:, 0][:, None, None], a[:, 1][:, None, None]   # (4, 1, 1): edges
    ux, uy = e[:, 0][:, None, None], e[:, 1][:, None, None]   # unit edge vectors (length 1)
    h = (ax - px) * uy - (ay - py) * ux                   # signed distance P → edge line
    hs = jnp.where(jnp.abs(h) < 1e-7, 1e-7, jnp.abs(h))
    tau_a = (ax - px) * ux + (ay - py) * uy               # A's position along the edge from the foot
    phi_a = jnp.arctan2(tau_a, hs)
    phi_b = jnp.arctan2(tau_a + 1.0, hs)
    phi = phi_a + (phi_b - phi_a) * t                     # (sy, sx, 4, 1, T)
    length = hs / jnp.cos(phi)
    sign = jnp.sign(h)
    # direction at angle φ from the normal (uy, −ux) towards the edge line
    dir_x = sign * jnp.cos(phi) * uy + jnp.sin(phi) * ux
    dir_y = -sign * jnp.cos(phi) * ux + jnp.sin(phi) * uy
    r = length * s                                        # (sy, sx, 4, U, T)
    xs = px + pcx[..., None, None, None] + r * dir_x
    ys = py + pcy[..., None, None, None] + r * dir_y
    vals = fn(Grid(xs, ys, grid.x0, grid.y0))
    block = jnp.sum(vals * w * (length**2 * (phi_b - phi_a) * sign), axis=(-3, -2, -1))
    return block, row0, col0


def render_oversampled(fn, grid: Grid, xc, yc, levels, shape, *, band_limited=False):
    """Pixel-integrated image of ``fn``: pixel means everywhere, exact where it is steep.

    Pixel-centre samples are turned into pixel means by :func:`pixel_average`; then nested
    central boxes ``levels = ((size, factor), ...)`` (outer first) are replaced by means over
    ``factor²`` sub-pixels, where the profile is too steep for the second-order correction;
    ``factor = 0`` means the triangle-fan quadrature of :func:`fan_block` (for the cusp).
    ``band_limited=True`` (images to be convolved with a PSF) renders the central
    CORE_SIZE² box by :func:`core_patch` instead (levels no larger than it are skipped).
    """
    image = pixel_average(fn(grid))
    origin = _grid_origin(grid)
    use_core = band_limited and min(shape) >= CORE_SIZE + 2 * CORE_HALO
    for size, factor in levels:
        if use_core and size <= CORE_SIZE:
            continue
        if factor == 0:
            block, r0, c0 = fan_block(fn, grid, xc, yc, size=size, shape=shape, origin=origin)
        else:
            block, r0, c0 = oversampled_box(fn, grid, xc, yc, size=size, factor=factor, shape=shape,
                                            origin=origin)
        image = lax.dynamic_update_slice(image, block.astype(image.dtype), (r0, c0))
    if use_core:
        box, r0, c0, delta, pr0, pc0 = core_patch(fn, grid, xc, yc, shape=shape, origin=origin)
        image = lax.dynamic_update_slice(image, box.astype(image.dtype), (r0, c0))
        patch = lax.dynamic_slice(image, (pr0, pc0), delta.shape) + delta.astype(image.dtype)
        image = lax.dynamic_update_slice(image, patch, (pr0, pc0))
    return image


# --------------------------------------------------------------------------- band-limited core
# Convolution on the pixel grid treats the pixel means of a profile as samples of a
# band-limited image. Near the cusp of a compact, high-n Sérsic that is far from true: the
# pixel means put the cusp's light at pixel centres (aliasing), so after the PSF the model's
# centre is pulled towards the nearest pixel centre (errors of tens of σ for n ≈ 5, re ≈ 2.5 px;
# more sub-pixels do not help, measured in benchmarks/README.md "Model fidelity"). The fix:
# the profile times a smooth window w (1 at the centre, 0 beyond CORE_SIZE/2 - 1/2 px) is
# integrated on CORE_FACTOR² sub-pixels per pixel, and the low-frequency part of its pixel-grid
# representation (spectral filter G: 1 below _CORE_K1 cycles/pixel, smoothly 0 at Nyquist) is
# replaced by the exact one: Ŝ(k)·sinc(k) (the pixel response) from the sub-pixel means, written
# as a patch of pixel values (the core box + CORE_HALO pixels; G's kernel is compact). Frequencies
# near Nyquist keep the pixel-mean representation (there the PSF has little power). Per axis
# this is a few static (patch × sub-pixel) matrices: the cost is that of a few small matmuls.
CORE_SIZE = 9
CORE_FACTOR = 7
CORE_HALO = 12
_CORE_K1 = 0.35


def _core_matrices(size=CORE_SIZE, factor=CORE_FACTOR, halo=CORE_HALO, k1=_CORE_K1):
    """Static 1-D operators of :func:`core_patch` (float32): ``D`` (patch × sub-pixel) maps
    sub-pixel means to band-limited (filter G) pixel values including the pixel response,
    ``g`` (patch × box pixel) applies G to pixel means, ``M`` (box pixel × sub-pixel) averages
    sub-pixels into pixels."""
    k = np.linspace(0.0, 0.5, 4001)
    x = np.clip((k - k1) / (0.5 - k1), 1e-12, 1 - 1e-12)
    a, b = np.exp(-1.0 / x), np.exp(-1.0 / (1.0 - x))
    G = np.where(k <= k1, 1.0, 1.0 - a / (a + b))
    G[-1] = 0.0
    u = (np.arange(size * factor) + 0.5) / factor - 0.5      # sub-pixel centres, box pixel units
    i = np.arange(size + 2 * halo) - halo                     # patch pixels, box pixel units
    wk = np.full(k.size, k[1] - k[0])
    wk[0] = wk[-1] = 0.5 * wk[1]                              # trapezoid weights on [0, 1/2]

    def ft(spec, t):                                          # ∫_{-1/2}^{1/2} spec(k) e^{2πikt} dk
        return 2.0 * np.einsum("k,k,...k->...", wk, spec, np.cos(2 * np.pi * k * t[..., None]))

    D = ft(G * np.sinc(k) * np.sinc(k / factor), i[:, None] - u[None, :]) / factor
    g = ft(G, (i[:, None] - np.arange(size)[None, :]).astype(float))
    # exact flux: every sub-pixel's (pixel's) light sums to one over the patch (the truncated
    # tails of G's kernel would leave ~1e-4)
    D *= (1.0 / factor) / D.sum(axis=0, keepdims=True)
    g /= g.sum(axis=0, keepdims=True)
    M = np.kron(np.eye(size), np.full((1, factor), 1.0 / factor))
    # second difference with edge-replicated neighbours, /24: sub-pixel means from samples
    # (a matrix product: cheaper than shifted copies under vmap + jacfwd at this size)
    n = size * factor
    lap = (np.eye(n, k=1) + np.eye(n, k=-1) - 2.0 * np.eye(n))
    lap[0, 0] = lap[-1, -1] = -1.0
    return D.astype(np.float32), g.astype(np.float32), M.astype(np.float32), (lap / 24.0).astype(np.float32)


_CORE = _core_matrices()


def core_patch(fn, grid: Grid, xc, yc, *, shape, origin=(0.0, 0.0)):
    """Band-limited rendering of a profile's core (see the note above :data:`CORE_SIZE`).

    Returns ``(box, r0, c0, delta, pr0, pc0)``: the core box's pixel means (CORE_SIZE², from
    sub-pixel means; the CORE_FACTOR-times finer 3×3 sub-pixels at the centre by the
    triangle fan) to write at ``(r0, c0)``, and the patch to ADD at ``(pr0, pc0)`` (the box +
    CORE_HALO each side) that swaps the low frequencies of the windowed core's pixel means for
    the exact ones. Needs ``shape`` ≥ CORE_SIZE + 2·CORE_HALO on both axes.
    """
    D, g, M, L = (jnp.asarray(a) for a in _CORE)
    size, f, halo = CORE_SIZE, CORE_FACTOR, CORE_HALO
    ny, nx = shape
    ox, oy = origin
    c0 = jnp.clip(jnp.round(xc - ox).astype(jnp.int32) - size // 2, halo, nx - size - halo)
    r0 = jnp.clip(jnp.round(yc - oy).astype(jnp.int32) - size // 2, halo, ny - size - halo)
    # sub-pixel a of the box has its centre at x = xf0 + a / f
    xf0 = c0.astype(jnp.float32) + ox + (0.5 / f - 0.5)
    yf0 = r0.astype(jnp.float32) + oy + (0.5 / f - 0.5)
    idx = jnp.arange(size * f, dtype=jnp.float32)
    yy, xx = jnp.meshgrid(yf0 + idx / f, xf0 + idx / f, indexing="ij")
    sub = fn(Grid(xx, yy, grid.x0, grid.y0))
    sub = sub + L @ sub + sub @ L.T                          # sub-pixel means (2nd order)

    def fn_fine(gg):  # the profile in sub-pixel index coordinates
        return fn(Grid(xf0 + gg.x / f, yf0 + gg.y / f, grid.x0, grid.y0))

    fan, fr0, fc0 = fan_block(fn_fine, grid, (xc - xf0) * f, (yc - yf0) * f, size=3, shape=sub.shape)
    sub = lax.dynamic_update_slice(sub, fan.astype(sub.dtype), (fr0, fc0))
    radius = (size - 1) / 2.0
    # w = (1 - d²/R²)² inside R: a polynomial in d² (no sqrt: smooth second derivatives for
    # the Laplace Hessian), 1 - w ≈ 2d²/R² removes the cusp from the remainder, C¹ at R
    u = 1.0 - ((xx - xc) ** 2 + (yy - yc) ** 2) / radius**2
    w = jnp.where(u > 0, u, 0.0) ** 2
    core = sub * w
    box = M @ sub @ M.T
    delta = D @ core @ D.T - g @ (M @ core @ M.T) @ g.T
    return box, r0, c0, delta, r0 - halo, c0 - halo

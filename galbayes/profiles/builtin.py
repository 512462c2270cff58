"""The built-in profiles (paper §4, App. D) with the paper's magnitude normalisation.

Every centred profile integrates to ``F = 10^(-0.4 (mag - zp))`` over the plane; ``box`` is
the generalised-ellipse boxiness B (B = 0: ellipse) with the area factor ``r_box``.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from ..geometry import _safe_pow, ellipse_radius
from ..params import IMAGE_LEVEL, IMAGE_X, IMAGE_Y, ParamSpec
from ..special import beta_fn, r_box, sersic_nu
from . import Profile, profile, register

__all__ = ["flux_from_mag", "CENTRE", "SHAPE"]


def flux_from_mag(mag, zp):
    """Total flux ``10^(-0.4 (mag - zp))``."""
    return jnp.power(10.0, -0.4 * (mag - zp))


CENTRE = (
    ParamSpec("xc", "pix", IMAGE_X, doc="centre column (0-based pixel centres)"),
    ParamSpec("yc", "pix", IMAGE_Y, doc="centre row (0-based pixel centres)"),
)
SHAPE = (
    ParamSpec("pa", "deg", (-90.0, 90.0), default=0.0, angle=True, doc="position angle, deg CCW from +y"),
    ParamSpec("q", "", (0.05, 1.0), default=0.8, doc="axis ratio b/a"),
)
MAG = ParamSpec("mag", "mag", (0.0, 40.0), doc="total magnitude with zero point zp")
BOX = ParamSpec("box", "", (-0.9, 1.5), default=0.0, doc="boxiness B (0 = ellipse, >0 boxy)")


def _radius(p, grid):
    return ellipse_radius(grid, p["xc"], p["yc"], p["pa"], p["q"], p.get("box", 0.0))


def _norm(p):
    """F · r_box / q: the factor every centred profile shares."""
    box = p.get("box", 0.0)
    rb = 1.0 if isinstance(box, (int, float)) and box == 0 else r_box(box)
    return flux_from_mag(p["mag"], p["zp"]) * rb / p["q"]


@profile("sersic", params=CENTRE + SHAPE + (
    ParamSpec("re", "pix", (0.1, 500.0), log=True, doc="half-light radius along the major axis"),
    ParamSpec("n", "", (0.2, 10.0), default=2.0, log=True, doc="Sérsic index"),
    MAG, BOX))
def sersic(p, grid):
    """Sérsic profile, I = Ie exp(-ν[(r/re)^(1/n) - 1]) (paper eq. 1, 5)."""
    n, re = p["n"], p["re"]
    nu = sersic_nu(n)
    log_ie = 2.0 * n * jnp.log(nu) - jnp.log(2.0 * jnp.pi * re**2 * n) - gammaln(2.0 * n) - nu
    x = _safe_pow(_radius(p, grid) / re, 1.0 / n)
    return _norm(p) * jnp.exp(log_ie - nu * (x - 1.0))


@profile("exponential", params=CENTRE + SHAPE + (
    ParamSpec("rs", "pix", (0.1, 500.0), log=True, doc="scale length along the major axis"),
    MAG, BOX))
def exponential(p, grid):
    """Exponential disk, I = I0 exp(-r/rs) (paper eq. 7-8)."""
    rs = p["rs"]
    return _norm(p) / (2.0 * jnp.pi * rs**2) * jnp.exp(-_radius(p, grid) / rs)


@profile("ferrer", params=CENTRE + SHAPE + (
    ParamSpec("rout", "pix", (0.5, 500.0), log=True, doc="outer truncation radius"),
    ParamSpec("alpha", "", (0.01, 10.0), default=2.0, doc="outer slope exponent α"),
    ParamSpec("beta", "", (-1.0, 1.99), default=0.0, doc="inner slope β (< 2)"),
    MAG, BOX))
def ferrer(p, grid):
    """Modified Ferrer, I = I0 [1 - (r/rout)^(2-β)]^α inside rout (paper eq. 9-10)."""
    a, b, rout = p["alpha"], p["beta"], p["rout"]
    u = jnp.minimum(_radius(p, grid) / rout, 1.0)
    inner = jnp.clip(1.0 - _safe_pow(u, 2.0 - b), 0.0, 1.0)
    i0 = _norm(p) / (jnp.pi * rout**2 * a * beta_fn(a, 1.0 + 2.0 / (2.0 - b)))
    return i0 * _safe_pow(inner, a)


# Gauss-Legendre nodes on [0, 1] for the King flux integral (in s = ln t).
_GL_X, _GL_W = np.polynomial.legendre.leggauss(96)
_GL_X = jnp.asarray(0.5 * (_GL_X + 1.0), jnp.float32)
_GL_W = jnp.asarray(0.5 * _GL_W, jnp.float32)


def _king_shape(t, t_max, alpha):
    """[(t^-1/α - T^-1/α) / (1 - T^-1/α)]^α with t = 1 + (r/rc)²: 1 at r = 0, 0 at rt."""
    ut = jnp.power(t_max, -1.0 / alpha)
    return _safe_pow(jnp.clip((jnp.power(t, -1.0 / alpha) - ut) / (1.0 - ut), 0.0, 1.0), alpha)


@profile("king", params=CENTRE + SHAPE + (
    ParamSpec("rc", "pix", (0.1, 500.0), log=True, doc="core radius"),
    ParamSpec("rt", "pix", (0.5, 2000.0), log=True, doc="truncation (tidal) radius"),
    ParamSpec("alpha", "", (0.1, 10.0), default=2.0, doc="power α (2 = King 1962)"),
    MAG, BOX))
def king(p, grid):
    """Empirical (modified) King profile, zero beyond rt (paper eq. 11); flux by quadrature."""
    rc, rt, alpha = p["rc"], p["rt"], p["alpha"]
    t_max = 1.0 + (rt / rc) ** 2
    # ∫0^rt 2π r I dr = π rc² I0 ∫_1^T shape(t) dt, with t = e^s, s ∈ [0, ln T].
    s_max = jnp.log(t_max)
    t_nodes = jnp.exp(_GL_X * s_max)
    integral = s_max * jnp.sum(_GL_W * t_nodes * _king_shape(t_nodes, t_max, alpha))
    i0 = _norm(p) / (jnp.pi * rc**2 * integral)
    r = _radius(p, grid)
    return i0 * _king_shape(1.0 + (jnp.minimum(r, rt) / rc) ** 2, t_max, alpha)


_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


@profile("gaussian", params=CENTRE + SHAPE + (
    ParamSpec("fwhm", "pix", (0.1, 500.0), log=True, doc="full width at half maximum (major axis)"),
    MAG, BOX))
def gaussian(p, grid):
    """Gaussian, I = I0 exp(-r²/2σ²), σ = FWHM/2.355 (paper eq. 12)."""
    sigma = p["fwhm"] * _FWHM_TO_SIGMA
    r = _radius(p, grid)
    return _norm(p) / (2.0 * jnp.pi * sigma**2) * jnp.exp(-0.5 * (r / sigma) ** 2)


@profile("moffat", params=CENTRE + SHAPE + (
    ParamSpec("fwhm", "pix", (0.1, 500.0), log=True, doc="full width at half maximum (major axis)"),
    ParamSpec("beta", "", (1.01, 20.0), default=3.0, doc="concentration index (the paper's n)"),
    MAG, BOX))
def moffat(p, grid):
    """Moffat, I = I0 [1 + (r/rd)²]^-β, rd = FWHM / (2√(2^(1/β) - 1)) (paper eq. 13-15)."""
    beta = p["beta"]
    rd = p["fwhm"] / (2.0 * jnp.sqrt(jnp.power(2.0, 1.0 / beta) - 1.0))
    r = _radius(p, grid)
    return _norm(p) * (beta - 1.0) / (jnp.pi * rd**2) * jnp.power(1.0 + (r / rd) ** 2, -beta)


@profile("sky", params=(ParamSpec("sky", "flux", IMAGE_LEVEL, default=0.0, doc="sky level per pixel"),),
         convolve=False)
def sky(p, grid):
    """Flat sky (paper eq. 16)."""
    return jnp.zeros_like(grid.x) + p["sky"]


@profile("tilted_sky", params=(
    ParamSpec("sky", "flux", IMAGE_LEVEL, default=0.0, doc="sky level at the image centre"),
    ParamSpec("dsky_dx", "flux", (-1.0, 1.0), default=0.0, doc="sky gradient along x, per pixel"),
    ParamSpec("dsky_dy", "flux", (-1.0, 1.0), default=0.0, doc="sky gradient along y, per pixel"),
), convolve=False)
def tilted_sky(p, grid):
    """Tilted-plane sky about the image centre (paper App. D)."""
    return p["sky"] + p["dsky_dx"] * (grid.x - grid.x0) + p["dsky_dy"] * (grid.y - grid.y0)


register(Profile("point", CENTRE + (MAG,), None, convolve=True, kind="point",
                 doc="PSF-shaped point source (the PSF image shifted to xc, yc, scaled to mag)"))

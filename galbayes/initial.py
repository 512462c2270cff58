"""Starting values from image moments, as a SExtractor run would give them.

Used for any parameter that neither the catalog nor the recipe initialises.
"""
from __future__ import annotations

import math

import numpy as np

from .data import Observation
from .params import wrap_angle

__all__ = ["moment_guess"]

# half-light radius → each profile's size parameter (for a face-on profile)
SIZE_FROM_RHALF = {"re": 1.0, "rs": 1.0 / 1.678, "rout": 1.6, "rc": 0.5, "rt": 4.0, "fwhm": 1.0}


def moment_guess(obs: Observation) -> dict:
    """Centre, position angle, axis ratio, half-light radius and magnitude of the central source.

    Returns a dict with ``xc, yc, pa, q, rhalf, mag`` in pixels/degrees/mag (0-based pixel
    centres, pa counter-clockwise from +y).
    """
    ny, nx = obs.shape
    d = np.where(obs.weight > 0, obs.image, 0.0).astype(np.float64)
    # background: median of the unmasked border
    border = np.concatenate([d[:3].ravel(), d[-3:].ravel(), d[:, :3].ravel(), d[:, -3:].ravel()])
    wb = np.concatenate([obs.weight[:3].ravel(), obs.weight[-3:].ravel(), obs.weight[:, :3].ravel(),
                         obs.weight[:, -3:].ravel()])
    bkg = float(np.median(border[wb > 0])) if np.any(wb > 0) else 0.0
    d = np.where(obs.weight > 0, d - bkg, 0.0)
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    radius = max(min(nx, ny) / 4.0, 3.0)
    for _ in range(5):  # iterate the centroid inside a window about the current centre
        win = ((x - xc) ** 2 + (y - yc) ** 2 <= radius**2) & (d > 0)
        w = np.where(win, d, 0.0)
        if w.sum() <= 0:
            break
        xc, yc = float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())
    w = np.where(((x - xc) ** 2 + (y - yc) ** 2 <= (2 * radius) ** 2) & (d > 0), d, 0.0)
    total = float(w.sum())
    if total <= 0:
        return {"xc": xc, "yc": yc, "pa": 0.0, "q": 0.8, "rhalf": 3.0, "mag": float(obs.zp + 2.5)}
    dx, dy = x - xc, y - yc
    mxx, myy, mxy = (w * dx * dx).sum() / total, (w * dy * dy).sum() / total, (w * dx * dy).sum() / total
    evals, evecs = np.linalg.eigh(np.array([[mxx, mxy], [mxy, myy]]))
    lam_min, lam_max = max(evals[0], 1e-6), max(evals[1], 1e-6)
    q = float(np.clip(math.sqrt(lam_min / lam_max), 0.1, 1.0))
    vx, vy = evecs[:, 1]
    theta = math.degrees(math.atan2(vy, vx))          # major axis from +x
    pa = wrap_angle(theta - 90.0)                     # from +y, wrapped to [-90, 90)
    th = math.radians(theta)
    xm = dx * math.cos(th) + dy * math.sin(th)
    ym = (-dx * math.sin(th) + dy * math.cos(th)) / q
    r = np.hypot(xm, ym)
    order = np.argsort(r.ravel())
    cum = np.cumsum(w.ravel()[order])
    rhalf = float(r.ravel()[order][np.searchsorted(cum, 0.5 * cum[-1])])
    # the masked-out and truncated light is missing: sum of positive pixels is a lower bound
    mag = float(obs.zp - 2.5 * math.log10(total))
    return {"xc": xc, "yc": yc, "pa": pa, "q": q, "rhalf": max(rhalf, 0.5), "mag": mag}

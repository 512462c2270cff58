"""Shared helpers for the galbayes test-suite (rendering a single profile, GalSim drawing)."""
from __future__ import annotations

import numpy as np

import galbayes as gb

ZP = 22.5


def flux_of(mag, zp=ZP):
    return 10.0 ** (-0.4 * (mag - zp))


def render_single(profile, params, shape, *, psf=None, zp=ZP, oversample=None, image=None):
    """Render one component through the public API (``galbayes.render_model``).

    Every parameter is held fixed at the given value except the profile's first one, which is
    free with wide explicit bounds (a model needs one free parameter).
    """
    prof = gb.get_profile(profile)
    first = prof.param_names[0]
    comp_params = {}
    for name, v in params.items():
        if name == first:
            comp_params[name] = gb.Param(init=float(v), bounds=(float(v) - 1e4, float(v) + 1e4))
        else:
            comp_params[name] = gb.Param(init=float(v), fixed=True)
    kw = {} if oversample is None else {"oversample": oversample}
    model = gb.Model([gb.Component("c", profile, comp_params)], **kw)
    psf = np.ones((1, 1)) if psf is None else psf
    img = np.zeros(shape) if image is None else image
    obs = gb.Observation(image=img, sigma=np.ones(shape), psf=psf, zp=zp)
    return np.asarray(gb.render_model(model, obs, None), dtype=np.float64)


def galsim_draw(obj, shape, xc, yc, *, real_space=False):
    """Draw a GalSim profile pixel-integrated on a ``shape`` stamp with scale 1, centred at
    the 0-based pixel coordinates ``(xc, yc)`` (GalSim's true centre is ((nx-1)/2, (ny-1)/2))."""
    import galsim

    ny, nx = shape
    offset = (xc - (nx - 1) / 2.0, yc - (ny - 1) / 2.0)
    if real_space:
        # Pixel integration done as a real-space convolution with the unit pixel: the same
        # quantity as method='auto', without GalSim's huge FFTs for high-n Sersic profiles.
        conv = galsim.Convolve([obj, galsim.Pixel(1.0)], real_space=True)
        return conv.drawImage(nx=nx, ny=ny, scale=1.0, method="no_pixel", offset=offset).array.astype(np.float64)
    return obj.drawImage(nx=nx, ny=ny, scale=1.0, method="auto", offset=offset).array.astype(np.float64)

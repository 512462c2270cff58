"""Parameter declarations (:class:`ParamSpec`) and user settings (:class:`Param`).

This is the only module that maps user units to the units the renderers use:

* sizes (``unit="pix"``) are given and reported in pixels, or in arcsec when the model has
  ``size_unit="arcsec"``; renderers always receive pixels;
* angles are in degrees (position angle counter-clockwise from +y);
* magnitudes use the galaxy's zero point ``zp``;
* a ``log`` parameter is *sampled* as ``log10(value)`` with a flat prior between the
  log-bounds (a log-uniform prior on the value); every other free parameter is sampled in
  user units with a flat prior between its bounds. With these flat priors the MAP is the
  maximum-likelihood point inside the bounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelError

__all__ = ["ParamSpec", "Param", "IMAGE_X", "IMAGE_Y", "IMAGE_LEVEL", "ANGLE_PERIOD", "wrap_angle"]

# Sentinels for bounds that depend on the image: the pixel extent along x or y.
IMAGE_X = "image_x"
IMAGE_Y = "image_y"
# Sentinel for sky-level bounds: ± the largest |pixel| among unmasked pixels.
IMAGE_LEVEL = "image_level"

#: Period of an ``angle`` parameter, in degrees: an ellipse is symmetric under a half turn,
#: so pa and pa ± 180° are the same profile.
ANGLE_PERIOD = 180.0


def wrap_angle(angle, mid=0.0):
    """The equivalent angle (± k·:data:`ANGLE_PERIOD`) in ``[mid − 90°, mid + 90°)``.

    Computed as ``mid + (angle − mid + 90) mod 180 − 90`` with the ``%`` operator, so it
    works alike for Python floats, NumPy arrays and JAX arrays (also under ``jit``), and
    ``mid`` may be an array broadcasting with ``angle``. With ``mid=0`` the result equals
    ``(angle + 90) % 180 − 90`` bit for bit.

    Parameters
    ----------
    angle : float or array
        Angles in degrees.
    mid : float or array
        Middle of the target interval (default 0: wrap into [-90°, 90°)).

    Returns
    -------
    float or array
        The wrapped angles (NaN stays NaN).
    """
    half = 0.5 * ANGLE_PERIOD
    return mid + (angle - mid + half) % ANGLE_PERIOD - half


@dataclass(frozen=True)
class ParamSpec:
    """Declaration of one profile parameter.

    Parameters
    ----------
    name : str
        Parameter name, e.g. ``"re"``.
    unit : str
        ``"pix"`` for sizes (converted to arcsec when asked), ``"deg"``, ``"mag"``,
        ``"flux"`` (image units per pixel), or ``""`` for dimensionless numbers.
    bounds : tuple
        Default (low, high), or a sentinel resolved per image: :data:`IMAGE_X` /
        :data:`IMAGE_Y` (the pixel extent along that axis, ``[-0.5, n-0.5]``) or
        :data:`IMAGE_LEVEL` (``±max|pixel|`` over unmasked pixels).
    default : float or None
        Default initial value (``None``: the user must give one).
    log : bool
        Sample ``log10(value)`` (log-uniform prior).
    angle : bool
        A position angle in degrees: the default bounds are ``init ± 180°`` (two periods of an
        ellipse's orientation, so that no answer sits on a bound) and results are wrapped into
        [-90°, 90°).
    doc : str
        One line for the documentation.
    """

    name: str
    unit: str = ""
    bounds: tuple = (-math.inf, math.inf)
    default: float | None = None
    log: bool = False
    angle: bool = False
    doc: str = ""

    @property
    def is_size(self) -> bool:
        return self.unit == "pix"


@dataclass(eq=False)
class Param:
    """User settings for one parameter.

    A ``Param`` object used in two components is one shared parameter (e.g. one centre
    for bulge and disk).

    Parameters
    ----------
    init : float, optional
        Initial value in user units (the profile's default if omitted).
    bounds : (float, float), optional
        Prior bounds in user units (the profile's default if omitted).
    fixed : bool
        Hold at ``init``.
    log : bool, optional
        Override the profile's choice of sampling ``log10(value)``.
    prior : numpyro.distributions.Distribution, optional
        Replaces the flat prior; it is a prior on the value in user units.
    """

    init: float | None = None
    bounds: tuple[float, float] | None = None
    fixed: bool = False
    log: bool | None = None
    prior: Any = None
    _name: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.bounds is not None:
            lo, hi = self.bounds
            if not (lo < hi):
                raise ModelError(f"bounds {self.bounds!r}: low must be < high")


def as_param(value) -> Param:
    """Coerce a number, a dict (recipe syntax) or a :class:`Param` into a :class:`Param`."""
    if isinstance(value, Param):
        return value
    if isinstance(value, (int, float)):
        return Param(init=float(value))
    if isinstance(value, dict):
        known = {"init", "bounds", "fixed", "log", "prior"}
        unknown = set(value) - known
        if unknown:
            raise ModelError(f"unknown parameter setting(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(value)
        if "bounds" in kw and kw["bounds"] is not None:
            kw["bounds"] = tuple(float(b) for b in kw["bounds"])
        if "init" in kw and kw["init"] is not None:
            kw["init"] = float(kw["init"])
        return Param(**kw)
    raise TypeError(f"cannot make a parameter from {value!r}")

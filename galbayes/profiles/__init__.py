"""Light profiles: small pure functions plus a declaration of their parameters.

A profile is a :class:`Profile`: a function ``fn(p, grid) -> image`` where ``p`` maps
parameter names to values in *pixel* units (sizes in pixels, ``pa`` in degrees, ``mag``
with the zero point ``p["zp"]``) and ``grid`` is a :class:`galbayes.geometry.Grid` of
coordinates of any shape; plus the :class:`~galbayes.params.ParamSpec` of each parameter.

Adding a profile takes a few lines (see ``notebooks/04_custom_profile.ipynb``)::

    from galbayes.params import ParamSpec
    from galbayes.profiles import profile

    @profile("tilted_sky2", params=[ParamSpec("sky", "flux", default=0.0, bounds=(-1, 1)),
                                    ParamSpec("gx", "flux", default=0.0, bounds=(-1, 1)),
                                    ParamSpec("gy", "flux", default=0.0, bounds=(-1, 1))],
             convolve=False)
    def tilted_sky2(p, grid):
        return p["sky"] + p["gx"] * (grid.x - grid.x0) + p["gy"] * (grid.y - grid.y0)

It is then usable by name in recipes and works with every fitter and sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ModelError
from ..params import ParamSpec

__all__ = ["Profile", "profile", "register", "get_profile", "available_profiles"]

_REGISTRY: dict[str, "Profile"] = {}


class UnknownProfileError(ModelError, KeyError):
    """An unknown profile name: a :class:`~galbayes.errors.ModelError` (and, for older
    callers, a ``KeyError``)."""

    __str__ = ValueError.__str__  # KeyError would quote the message


@dataclass(frozen=True)
class Profile:
    """A light profile.

    Parameters
    ----------
    name : str
        Registry name used in recipes.
    params : tuple of ParamSpec
        Its parameters, in order.
    fn : callable
        ``fn(p, grid) -> array`` of the grid's shape: surface brightness per pixel.
    convolve : bool
        Whether the PSF is applied by default (False for sky models).
    kind : str
        ``"image"`` (rendered by ``fn``) or ``"point"`` (a PSF-shaped point source placed by
        the model in Fourier space; ``fn`` is unused).
    doc : str
        One-line description.
    """

    name: str
    params: tuple
    fn: Callable | None
    convolve: bool = True
    kind: str = "image"
    doc: str = ""

    def __post_init__(self):
        names = [s.name for s in self.params]
        if len(set(names)) != len(names):
            raise ModelError(f"profile {self.name!r}: duplicate parameter names {names}")
        for s in self.params:
            if not isinstance(s, ParamSpec):
                raise TypeError(f"profile {self.name!r}: parameters must be ParamSpec, got {s!r}")

    @property
    def param_names(self) -> tuple:
        return tuple(s.name for s in self.params)

    @property
    def centred(self) -> bool:
        """Profiles with ``xc, yc`` get sub-pixel oversampling around their centre."""
        return "xc" in self.param_names and "yc" in self.param_names

    def spec(self, name: str) -> ParamSpec:
        for s in self.params:
            if s.name == name:
                return s
        raise KeyError(f"profile {self.name!r} has no parameter {name!r}; it has {list(self.param_names)}")

    def __call__(self, p, grid):
        return self.fn(p, grid)


def register(prof: Profile, *, overwrite: bool = False) -> Profile:
    """Add a profile to the registry so recipes can name it."""
    if prof.name in _REGISTRY and not overwrite:
        raise ModelError(f"a profile named {prof.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[prof.name] = prof
    return prof


def profile(name: str, *, params, convolve: bool = True, doc: str = "", overwrite: bool = False):
    """Decorator: turn ``fn(p, grid)`` into a registered :class:`Profile`."""

    def wrap(fn):
        return register(Profile(name, tuple(params), fn, convolve=convolve, doc=doc or (fn.__doc__ or "").strip().split("\n")[0]),
                        overwrite=overwrite)

    return wrap


def get_profile(name) -> Profile:
    if isinstance(name, Profile):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownProfileError(f"unknown profile {name!r}; available: {sorted(_REGISTRY)}") from None


def available_profiles() -> list:
    return sorted(_REGISTRY)


from . import builtin  # noqa: E402,F401  (registers the built-in profiles)

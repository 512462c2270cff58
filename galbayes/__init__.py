"""galbayes: batched Bayesian galaxy light-profile fitting on GPUs (GALMOSS as a numpyro program).

The everyday API is at the top level::

    import galbayes as gb
    model = gb.load_recipe("sersic")
    out = gb.fit(model, [gb.Observation(image=..., sigma=..., psf=...)])

Building blocks (``Model``, ``Component``, ``Param``, ``ParamSpec``, ``profile``) are imported
eagerly; the pipeline and inference entry points (``fit``, ``fit_catalog``, ``read_catalog``,
``load_recipe``, ``fit_map``, ``MapOptions``, ``laplace_errors``, ``bootstrap_errors``,
``run_nuts``) load their modules on first use, so ``import galbayes`` stays light.
"""
from importlib import import_module

from .data import Observation, load_fits
from .errors import CatalogError, GalbayesError, InputError, ModelError, OptionsError
from .model import Component, GalaxyArrays, Model, render_model
from .params import Param, ParamSpec
from .profiles import Profile, available_profiles, get_profile, profile, register
from .special import sersic_nu

__version__ = "0.1.0"

#: Top-level names served lazily: name -> module that defines it.
_LAZY = {
    "fit": ".pipeline", "fit_catalog": ".pipeline", "FitOutput": ".pipeline",
    "load_recipe": ".recipe", "read_catalog": ".catalog",
    "fit_map": ".inference", "MapOptions": ".inference", "MapResult": ".inference",
    "laplace_errors": ".inference", "bootstrap_errors": ".inference", "run_nuts": ".inference",
}

__all__ = ["Observation", "load_fits", "GalbayesError", "InputError", "ModelError", "OptionsError",
           "CatalogError", "Component", "GalaxyArrays", "Model", "render_model", "Param", "ParamSpec", "Profile",
           "available_profiles", "get_profile", "profile", "register", "sersic_nu", "__version__",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'galbayes' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

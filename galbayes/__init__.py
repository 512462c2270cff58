"""galbayes: batched Bayesian galaxy light-profile fitting on GPUs (GALMOSS as a numpyro program)."""
from .data import Observation, load_fits
from .errors import InputError, ModelError
from .model import Component, GalaxyArrays, Model, render_model
from .params import Param, ParamSpec
from .profiles import Profile, available_profiles, get_profile, profile, register
from .special import sersic_nu

__version__ = "0.1.0"

__all__ = ["Observation", "load_fits", "InputError", "ModelError", "Component", "GalaxyArrays",
           "Model", "render_model", "Param", "ParamSpec", "Profile", "available_profiles",
           "get_profile", "profile", "register", "sersic_nu", "__version__"]

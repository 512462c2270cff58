"""Model recipes: a TOML file → :class:`~galbayes.model.Model`.

Format (see ``models/*.toml``)::

    likelihood = "chi2"          # or "gaussian"
    size_unit = "pix"            # or "arcsec" (needs the catalog's pixel_scale)
    oversample = [[11, 5], [3, 0]]   # optional, see galbayes.model.DEFAULT_OVERSAMPLE
    psf_type = "effective"       # optional: "effective" (default; the PSF image includes the
                                 # pixel response) or "optical" (sampled at pixel centres);
                                 # a catalog's psf_type column overrides it per galaxy

    [components.bulge]           # components in file order; the name prefixes columns
    profile = "sersic"
    convolve = true              # optional
    params.n = { init = 4.0, bounds = [0.5, 10.0], fixed = false, log = true }
    params.q = 0.8               # a bare number is an initial value

    [components.disk]
    profile = "exponential"
    params.xc = "bulge.xc"       # shared with the bulge
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import ModelError
from .model import DEFAULT_OVERSAMPLE, Component, Model

__all__ = ["load_recipe", "recipe_from_dict", "recipe_path", "builtin_recipes"]

_BUILTIN = Path(__file__).resolve().parent / "recipes"
_TOP_KEYS = {"likelihood", "size_unit", "oversample", "components", "description", "psf_type"}
_COMP_KEYS = {"profile", "params", "convolve"}


def builtin_recipes() -> list:
    """Names of the recipes shipped in ``models/``."""
    return sorted(p.stem for p in _BUILTIN.glob("*.toml"))


def recipe_path(name_or_path) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (``"sersic"``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    cand = _BUILTIN / (p.name if p.suffix == ".toml" else p.name + ".toml")
    if cand.exists():
        return cand
    raise ModelError(f"recipe {str(name_or_path)!r} not found (shipped recipes: {builtin_recipes()})")


def recipe_from_dict(cfg: dict, *, source: str = "recipe", likelihood: str | None = None,
                     psf_type: str | None = None) -> Model:
    """Build a :class:`Model` from a parsed recipe; errors name the source and key.
    ``likelihood`` and ``psf_type`` override the recipe's keys."""
    unknown = set(cfg) - _TOP_KEYS
    if unknown:
        raise ModelError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    comps_cfg = cfg.get("components")
    if not isinstance(comps_cfg, dict) or not comps_cfg:
        raise ModelError(f"{source}: needs at least one [components.NAME] table")
    components = []
    for name, c in comps_cfg.items():
        if not isinstance(c, dict):
            raise ModelError(f"{source}: [components.{name}] must be a table")
        bad = set(c) - _COMP_KEYS
        if bad:
            raise ModelError(f"{source}: [components.{name}] unknown key(s) {sorted(bad)}; allowed: {sorted(_COMP_KEYS)}")
        if "profile" not in c:
            raise ModelError(f"{source}: [components.{name}] has no 'profile'")
        components.append(Component(name, c["profile"], dict(c.get("params", {})), c.get("convolve")))
    try:
        return Model(components,
                     likelihood=likelihood or cfg.get("likelihood", "chi2"),
                     size_unit=cfg.get("size_unit", "pix"),
                     oversample=cfg.get("oversample", DEFAULT_OVERSAMPLE),
                     psf_type=psf_type or cfg.get("psf_type"))
    except (ModelError, KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise ModelError(f"{source}: {msg}") from None


def load_recipe(name_or_path, *, likelihood: str | None = None, psf_type: str | None = None) -> Model:
    """Read a TOML recipe (a path or a shipped recipe's name) into a :class:`Model`
    (``likelihood``, ``psf_type``: override the recipe's keys)."""
    path = recipe_path(name_or_path)
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{path}: not valid TOML: {exc}") from None
    model = recipe_from_dict(cfg, source=str(path), likelihood=likelihood, psf_type=psf_type)
    model.source = str(path)
    return model

"""A model: components + PSF → one galaxy's model image, and its numpyro model.

:class:`Model` is built once from a list of :class:`Component`. For each galaxy,
:meth:`Model.pack` turns an :class:`~galbayes.data.Observation` (plus optional per-galaxy
initial values) into a :class:`GalaxyArrays` pytree of fixed-shape arrays; stacking those
gives a batch, and every function below works on ONE galaxy and is batched with
``jax.vmap``.

Parameter vector layout: every distinct parameter (shared ones once) is an *entry*, keyed
``<component>_<param>``; the free entries are the numpyro sample sites, in entry order.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from .data import Observation
from .errors import InputError, ModelError
from .geometry import Grid, pixel_grid, render_oversampled
from .initial import SIZE_FROM_RHALF, moment_guess
from .likelihood import check_likelihood, chi2, chi2_distribution_loglike, gaussian_loglike
from .params import ANGLE_PERIOD, IMAGE_LEVEL, IMAGE_X, IMAGE_Y, Param, ParamSpec, as_param, wrap_angle
from .profiles import Profile, get_profile
from .profiles.builtin import flux_from_mag
from .psf import (DEFAULT_PSF_TYPE, PSF_TYPES, UNDERSAMPLED_FWHM, canvas_fft_shape, canvas_margin, canvas_shape,
                  check_psf_type, convolve_canvas, delta_hat, kernel_fft, optical_kernel, psf_fwhm)
from .traced import canon

__all__ = ["Component", "Model", "GalaxyArrays", "DEFAULT_OVERSAMPLE", "pack_arrays"]

#: Nested central boxes ``(size in pixels, sub-pixels per side)`` where centred profiles
#: are integrated over the pixel area (outer box first); factor 0 = triangle-fan quadrature
#: from the profile centre (exact for the cusp of high-n Sérsic profiles).
DEFAULT_OVERSAMPLE = ((11, 5), (3, 0))

# Default initial values for sizes when neither the recipe nor the profile gives one.
_DEFAULT_SIZE = {"re": 5.0, "rs": 5.0, "rout": 10.0, "rc": 2.0, "rt": 20.0, "fwhm": 3.0}


@dataclass
class Component:
    """One profile instance in a model.

    Parameters
    ----------
    name : str
        Component name; prefixes its parameters (``bulge_re``).
    profile : str or Profile
        Registered profile name or a :class:`~galbayes.profiles.Profile`.
    params : dict
        Per parameter: a number (initial value), a :class:`~galbayes.params.Param`, a dict of
        Param fields, or a string ``"other.param"`` to share another component's parameter.
        ``box`` is fixed at 0 unless given.
    convolve : bool, optional
        Override the profile's default (PSF on for light profiles, off for sky).
    """

    name: str
    profile: object
    params: dict = field(default_factory=dict)
    convolve: bool | None = None


class Entry(NamedTuple):
    key: str            # "<component>_<param>" of its first owner
    spec: ParamSpec
    param: Param
    log: bool
    static_zero: bool   # a fixed box = 0: renderers take the cheaper exact-ellipse path


class GalaxyArrays(NamedTuple):
    """One galaxy as fixed-shape arrays (a pytree; stack along axis 0 for a batch)."""

    image: jnp.ndarray     # (ny, nx) float32, masked pixels 0
    sigma: jnp.ndarray     # (ny, nx) float32, masked pixels 1
    weight: jnp.ndarray    # (ny, nx) float32 Ω: 1 = fit the pixel
    psf: jnp.ndarray       # (ky, kx) float32, unit sum
    psf_hat: jnp.ndarray   # rfft2 of the PSF as given (padded to the kernel's frame): point sources
    kernel_hat: jnp.ndarray  # rfft2 of the kernel for pixel-integrated profiles (psf.optical_kernel)
    psf_kind: jnp.ndarray  # () int32: the PSF kind, index into galbayes.psf.PSF_TYPES
    zp: jnp.ndarray        # () zero point
    scale: jnp.ndarray     # () size-unit per pixel (arcsec/pix, or 1 for pixels)
    values0: jnp.ndarray   # (E,) every entry's initial/fixed value, user units
    lo: jnp.ndarray        # (S,) lower bound of each free entry, user units
    hi: jnp.ndarray        # (S,) upper bound
    centre: jnp.ndarray    # (2,) x0, y0: geometric centre of the real stamp (tilted sky; kept by bucket padding)


class Model:
    """A sum of light profiles convolved with the PSF, plus unconvolved terms (sky).

    Parameters
    ----------
    components : list of Component
        The profiles; names must be unique.
    likelihood : {"chi2", "gaussian"}
        Pixel likelihood for posteriors (see :mod:`galbayes.likelihood`).
    size_unit : {"pix", "arcsec"}
        Units of sizes for initial values, bounds and results (arcsec needs the galaxy's
        ``pixel_scale``).
    oversample : sequence of (int, int)
        Nested central boxes (size, factor) integrated over sub-pixels for centred
        profiles; ``()`` samples pixel centres only.
    psf_type : {"effective", "optical"}, optional
        Kind of the PSF images for galaxies whose :class:`~galbayes.data.Observation` does not
        say (``None``: ``"effective"``, the image includes the pixel response, as PSFs measured
        from stars do). See :mod:`galbayes.psf`.
    core : bool
        Render the centre of convolved profiles band-limited (exact low spatial frequencies,
        :func:`galbayes.geometry.core_patch`); ``False`` gives plain pixel means (faster, but
        compact high-n profiles come out tens of σ off).
    """

    def __init__(self, components, *, likelihood: str = "chi2", size_unit: str = "pix",
                 oversample=DEFAULT_OVERSAMPLE, psf_type: str | None = None, core: bool = True):
        if not components:
            raise ModelError("a model needs at least one component")
        if psf_type is not None:
            try:
                psf_type = check_psf_type(psf_type)
            except InputError as exc:
                raise ModelError(str(exc)) from None
        self.psf_type = psf_type
        self.core = bool(core)
        if size_unit not in ("pix", "arcsec"):
            raise ModelError(f"size_unit must be 'pix' or 'arcsec', got {size_unit!r}")
        self.likelihood = check_likelihood(likelihood)
        self.size_unit = size_unit
        self.oversample = tuple((int(s), int(f)) for s, f in oversample)
        self.components = list(components)
        names = [c.name for c in self.components]
        if len(set(names)) != len(names):
            raise ModelError(f"component names must be unique, got {names}")
        self.profiles = {c.name: get_profile(c.profile) for c in self.components}
        self._build_entries()

    # ------------------------------------------------------------------ structure
    def _build_entries(self):
        entries, by_param, slots = [], {}, {}
        pending_refs = []
        for comp in self.components:
            prof = self.profiles[comp.name]
            unknown = set(comp.params) - set(prof.param_names)
            if unknown:
                raise ModelError(f"component {comp.name!r} ({prof.name}): unknown parameter(s) "
                                 f"{sorted(unknown)}; it has {list(prof.param_names)}")
            for spec in prof.params:
                raw = comp.params.get(spec.name)
                if isinstance(raw, str):
                    pending_refs.append((comp.name, spec, raw))
                    continue
                if raw is None:
                    param = Param(fixed=(spec.name == "box"), init=0.0 if spec.name == "box" else None)
                else:
                    try:
                        param = as_param(raw)
                    except (ValueError, TypeError) as exc:
                        raise ModelError(f"{comp.name}.{spec.name}: {exc}") from None
                if id(param) in by_param:
                    slots[(comp.name, spec.name)] = by_param[id(param)]
                    continue
                log = spec.log if param.log is None else bool(param.log)
                static_zero = spec.name == "box" and param.fixed and (param.init or 0.0) == 0.0
                by_param[id(param)] = len(entries)
                slots[(comp.name, spec.name)] = len(entries)
                entries.append(Entry(f"{comp.name}_{spec.name}", spec, param, log, static_zero))
        for comp_name, spec, ref in pending_refs:
            target = tuple(ref.split(".", 1)) if "." in ref else None
            if target is None or target not in slots:
                raise ModelError(f"{comp_name}.{spec.name} = {ref!r}: not a known 'component.param' "
                                 f"(known: {sorted('.'.join(k) for k in slots)})")
            other = entries[slots[target]].spec
            if other.unit != spec.unit:
                raise ModelError(f"{comp_name}.{spec.name} shares {ref!r} but their units differ "
                                 f"({spec.unit!r} vs {other.unit!r})")
            slots[(comp_name, spec.name)] = slots[target]
        self.entries = entries
        self.slots = slots
        self.free = [i for i, e in enumerate(entries) if not e.param.fixed]
        if not self.free:
            raise ModelError("the model has no free parameter")
        for e in entries:
            b = e.param.bounds
            if b is not None and e.log and b[0] <= 0:
                raise ModelError(f"{e.key}: bounds {b} must be > 0 for a log-sampled parameter")

    @property
    def log_sampled(self) -> list:
        """Per free parameter (free order): is it sampled as its log10 (a log parameter
        without a user prior)?"""
        return [self.entries[i].log and self.entries[i].param.prior is None for i in self.free]

    @property
    def site_names(self) -> list:
        """numpyro sample-site name of each free parameter, in free order (``<key>_log10``
        for log-sampled parameters)."""
        return [self.entries[i].key + "_log10" if log else self.entries[i].key
                for i, log in zip(self.free, self.log_sampled)]

    @property
    def axis_ratio_pairs(self) -> list:
        """``(free position of q, free position of pa)`` of every ellipse whose axis ratio
        ``q`` and position angle ``pa`` are both free and owned by the same components.

        An ellipse of axis ratio q at angle pa equals one of axis ratio 1/q at pa ± 90°, so a
        fit that wants q > 1 ends on the bound q = 1 with an arbitrary pa; the MAP fitter
        restarts such fits from q < 1 at pa + 90° (:mod:`galbayes.inference.map`).
        """
        owners: dict = {}
        for (comp, name), idx in self.slots.items():
            owners.setdefault(idx, set()).add(comp)
        pairs = []
        for comp in self.components:
            names = self.profiles[comp.name].param_names
            if "q" not in names or "pa" not in names:
                continue
            iq, ipa = self.slots[(comp.name, "q")], self.slots[(comp.name, "pa")]
            if not self.entries[ipa].spec.angle or iq not in self.free or ipa not in self.free:
                continue
            if owners[iq] != owners[ipa]:
                continue
            pair = (self.free.index(iq), self.free.index(ipa))
            if pair not in pairs:
                pairs.append(pair)
        return pairs

    @property
    def keys(self) -> list:
        """Every entry's name, ``<component>_<param>``, in vector order."""
        return [e.key for e in self.entries]

    @property
    def free_keys(self) -> list:
        """Names of the free parameters (numpyro sample sites), in order."""
        return [self.entries[i].key for i in self.free]

    @property
    def n_free(self) -> int:
        return len(self.free)

    def describe(self) -> str:
        rows = []
        for e in self.entries:
            state = "fixed" if e.param.fixed else ("free, log" if e.log else "free")
            rows.append(f"{e.key:<20} {e.spec.unit or '-':<5} {state}")
        return "\n".join(rows)

    # ------------------------------------------------------------------ per galaxy
    def _unit_scale(self, obs: Observation, spec: ParamSpec) -> float:
        if not spec.is_size or self.size_unit == "pix":
            return 1.0
        if obs.pixel_scale is None:
            raise InputError("the model gives sizes in arcsec but no pixel_scale was given",
                             galaxy=obs.id, what="pixel_scale")
        return float(obs.pixel_scale)

    def _default_init(self, obs: Observation, spec: ParamSpec, comp_count: int, guess: dict | None) -> float:
        ny, nx = obs.shape
        if guess is not None:
            if spec.name in ("xc", "yc", "pa", "q"):
                return float(guess[spec.name])
            if spec.name == "mag":
                return float(guess["mag"] + 2.5 * math.log10(max(comp_count, 1)))
            if spec.name in SIZE_FROM_RHALF:
                return float(guess["rhalf"] * SIZE_FROM_RHALF[spec.name])
        if spec.default is not None:
            return float(spec.default)
        if spec.bounds == IMAGE_X or spec.name == "xc":
            return (nx - 1) / 2.0
        if spec.bounds == IMAGE_Y or spec.name == "yc":
            return (ny - 1) / 2.0
        if spec.name == "mag":
            total = float(np.sum(obs.image * obs.weight))
            return float(obs.zp - 2.5 * math.log10(max(total / max(comp_count, 1), 1e-30)))
        if spec.name in _DEFAULT_SIZE:
            return _DEFAULT_SIZE[spec.name]
        raise ModelError(f"parameter {spec.name!r} has no default initial value; give one")

    def _default_bounds(self, obs: Observation, spec: ParamSpec, init: float):
        ny, nx = obs.shape
        if spec.angle:
            # Two periods of an ellipse's orientation (symmetric under 180°): every
            # orientation has an equivalent angle at least 90° from either bound, so a fit never
            # has to stop on an angle bound (with init ± 90° an answer 90° from the start sits
            # on the bound, where the bounded transform saturates).
            return init - ANGLE_PERIOD, init + ANGLE_PERIOD
        if spec.bounds == IMAGE_X:
            return -0.5, nx - 0.5
        if spec.bounds == IMAGE_Y:
            return -0.5, ny - 0.5
        if spec.bounds == IMAGE_LEVEL:
            level = float(np.max(np.abs(obs.image[obs.weight > 0])))
            level = max(level, 1e-12)
            return -level, level
        return tuple(float(b) for b in spec.bounds)

    def initial_values(self, obs: Observation, init: dict | None = None, *, bounds: dict | None = None,
                       guess: bool = True):
        """Initial values of every entry and bounds of the free ones, in user units.

        Precedence: ``init`` (per-galaxy values keyed ``<component>_<param>``, e.g. catalog
        columns) > the model's ``Param.init`` > image moments (:func:`~galbayes.initial.moment_guess`,
        for centre, pa, q, sizes and mag; ``guess=False`` skips it) > the profile's default.

        ``bounds`` (per-galaxy, keyed like ``init``, values ``(lo, hi)`` with None for "the
        model's") replace the model's bounds of a free parameter for this galaxy, and with them
        its uniform prior.
        """
        moments = moment_guess(obs) if guess else None
        init = dict(init or {})
        unknown = set(init) - set(self.keys)
        if unknown:
            raise ModelError(f"initial values given for unknown parameter(s) {sorted(unknown)}; "
                             f"the model has {self.keys}")
        bounds = dict(bounds or {})
        unknown = set(bounds) - set(self.free_keys)
        if unknown:
            raise ModelError(f"bounds given for parameter(s) {sorted(unknown)} that are not free parameters "
                             f"of the model (free: {self.free_keys})")
        n_light = sum(1 for c in self.components if self.profiles[c.name].convolve)
        values, lo, hi = [], [], []
        for i, e in enumerate(self.entries):
            scale = self._unit_scale(obs, e.spec)
            v = init.get(e.key, e.param.init)
            guessed = v is None or (isinstance(v, float) and math.isnan(v))
            if guessed:
                v = self._default_init(obs, e.spec, n_light, moments) * (scale if e.spec.is_size else 1.0)
            v = float(v)
            if e.static_zero and v != 0.0:
                raise ModelError(f"{e.key} is fixed at 0 in the model; make it free or fixed in the "
                                 "model to change it")
            values.append(v)
            if e.param.fixed:
                continue
            if e.param.bounds is not None:
                b = e.param.bounds
            else:
                b = self._default_bounds(obs, e.spec, v)
                if e.spec.is_size and not isinstance(e.spec.bounds, str):
                    b = (b[0] * scale, b[1] * scale)
            if e.key in bounds:
                given = bounds[e.key]
                b = tuple(float(g) if g is not None else float(d) for g, d in zip(given, b))
                if not all(math.isfinite(x) for x in b):
                    raise InputError(f"bounds {b} are not finite", galaxy=obs.id, what=e.key)
                if guessed and b[0] < b[1]:
                    v = float(min(max(v, b[0]), b[1]))   # a guessed start moves inside the given bounds
                    values[-1] = v
            if not b[0] < b[1]:
                raise InputError(f"bounds {b} are inverted or empty", galaxy=obs.id, what=e.key)
            if e.log and b[0] <= 0:
                raise InputError(f"bounds {b} must be > 0 for a log-sampled parameter", galaxy=obs.id, what=e.key)
            if not (b[0] <= v <= b[1]):
                raise InputError(f"initial value {v:g} is outside its bounds [{b[0]:g}, {b[1]:g}]",
                                 galaxy=obs.id, what=e.key)
            # A start exactly on a bound maps to an infinite unconstrained coordinate and
            # would never move: start a little (0.1% of the range) inside instead.
            if not e.spec.angle:
                margin = 1e-3 * (b[1] - b[0])
                values[-1] = float(min(max(v, b[0] + margin), b[1] - margin))
            lo.append(b[0])
            hi.append(b[1])
        return np.asarray(values, np.float32), np.asarray(lo, np.float32), np.asarray(hi, np.float32)

    def psf_type_of(self, obs: Observation) -> str:
        """The galaxy's PSF kind: the Observation's, else the model's, else ``"effective"``."""
        kind = getattr(obs, "psf_type", None) or self.psf_type or DEFAULT_PSF_TYPE
        return check_psf_type(kind, galaxy=obs.id)

    def pack(self, obs: Observation, init: dict | None = None, *, bounds: dict | None = None,
             guess: bool = True) -> GalaxyArrays:
        """One galaxy's :class:`GalaxyArrays` (numpy leaves; stack for a batch); ``init`` and
        ``bounds`` as in :meth:`initial_values`.

        The convolution kernel (the PSF with the pixel response divided out for an effective
        PSF) is computed here, once per galaxy, from the PSF image alone; only its zero-padded
        FFT depends on the stamp shape.
        """
        values0, lo, hi = self.initial_values(obs, init, bounds=bounds, guess=guess)
        scale = 1.0
        if self.size_unit == "arcsec":
            scale = self._unit_scale(obs, ParamSpec("s", "pix"))
        return pack_arrays(obs.image, obs.sigma, obs.weight, obs.psf, obs.zp, scale, values0, lo, hi,
                           psf_type=self.psf_type_of(obs), galaxy=obs.id)

    @staticmethod
    def stack(galaxies) -> GalaxyArrays:
        """Stack packed galaxies (same image and PSF shapes) into a batch."""
        return GalaxyArrays(*(np.stack(leaf) for leaf in zip(*galaxies)))

    # ------------------------------------------------------------------ rendering
    def component_values(self, values, gal: GalaxyArrays) -> dict:
        """Per component, a dict of renderer inputs (sizes in pixels, ``zp`` added)."""
        out = {}
        for comp in self.components:
            prof = self.profiles[comp.name]
            p = {"zp": gal.zp}
            for spec in prof.params:
                idx = self.slots[(comp.name, spec.name)]
                e = self.entries[idx]
                if e.static_zero:
                    p[spec.name] = 0.0
                    continue
                v = values[idx]
                p[spec.name] = v / gal.scale if spec.is_size else v
            out[comp.name] = p
        return out

    def _convolved(self, comp) -> bool:
        prof = self.profiles[comp.name]
        return prof.convolve if comp.convolve is None else bool(comp.convolve)

    @staticmethod
    def canvas_shape(gal: GalaxyArrays) -> tuple:
        """Shape of the padded canvas on which convolved profiles are rendered: the stamp
        plus the PSF's half-size on each side (static; :func:`galbayes.psf.canvas_shape`)."""
        return canvas_shape(gal.image.shape, gal.psf.shape)

    def _grids(self, gal: GalaxyArrays):
        """(stamp grid, canvas grid); both keep ``x0, y0`` of the real stamp."""
        shape = gal.image.shape
        margin = canvas_margin(gal.psf.shape)
        grid, canvas = pixel_grid(shape), pixel_grid(self.canvas_shape(gal), margin=margin, stamp_shape=shape)
        x0, y0 = gal.centre[0], gal.centre[1]     # the real stamp's, also in a padded bucket (batching.py)
        return grid._replace(x0=x0, y0=y0), canvas._replace(x0=x0, y0=y0)

    def _point_hat(self, p, gal: GalaxyArrays):
        my, mx = canvas_margin(gal.psf.shape)
        return delta_hat(p["xc"] + mx, p["yc"] + my, flux_from_mag(p["mag"], p["zp"]), gal.psf_hat)

    def render_parts(self, values, gal: GalaxyArrays):
        """(sum of components to convolve on the padded canvas, Fourier point-source term in
        canvas coordinates, unconvolved sum on the stamp); each is ``None`` when the model has
        no such component. :meth:`convolve` + the unconvolved sum = :meth:`render`."""
        grid, canvas = self._grids(gal)
        pv = self.component_values(values, gal)
        conv, point_hat, direct = None, None, None
        for comp in self.components:
            prof, p = self.profiles[comp.name], pv[comp.name]
            if prof.kind == "point":
                term = self._point_hat(p, gal)
                point_hat = term if point_hat is None else point_hat + term
                continue
            if self._convolved(comp):
                img = self.render_profile(prof, p, canvas, canvas.x.shape, band_limited=gal.psf.size > 1)
                conv = img if conv is None else conv + img
            else:
                img = self.render_profile(prof, p, grid, grid.x.shape)
                direct = img if direct is None else direct + img
        return conv, point_hat, direct

    @staticmethod
    def convolve(conv, point_hat, gal: GalaxyArrays):
        """The stamp of PSF ⊛ (canvas ``conv`` + point sources ``point_hat``); linear in both
        (``conv`` may be ``None``)."""
        return convolve_canvas(conv, gal.kernel_hat, gal.psf.shape, gal.image.shape, point_hat, gal.psf_hat)

    def render_profile(self, prof: Profile, p: dict, grid: Grid, shape, band_limited: bool = False):
        """One profile's (unconvolved) image, oversampled at its centre; ``band_limited``
        (for images convolved with a PSF of more than one pixel) renders the core exactly in
        the low spatial frequencies (:func:`galbayes.geometry.core_patch`)."""
        fn = lambda g: prof.fn(p, g)  # noqa: E731
        if prof.centred and self.oversample:
            return render_oversampled(fn, grid, p["xc"], p["yc"], self.oversample, shape,
                                      band_limited=band_limited and self.core)
        return jnp.broadcast_to(fn(grid), shape)

    def render(self, values, gal: GalaxyArrays):
        """The model image M = PSF ⊛ Σ convolved components + Σ unconvolved ones."""
        conv, point_hat, direct = self.render_parts(values, gal)
        out = jnp.zeros(gal.image.shape, jnp.float32)
        if conv is not None or point_hat is not None:
            out = out + self.convolve(conv, point_hat, gal)
        if direct is not None:
            out = out + direct
        return out

    def render_components(self, values, gal: GalaxyArrays) -> dict:
        """Each component's image as it enters the model (convolved where it is)."""
        grid, canvas = self._grids(gal)
        pv = self.component_values(values, gal)
        out = {}
        for comp in self.components:
            prof, p = self.profiles[comp.name], pv[comp.name]
            if prof.kind == "point":
                out[comp.name] = self.convolve(None, self._point_hat(p, gal), gal)
            elif self._convolved(comp):
                img = self.render_profile(prof, p, canvas, canvas.x.shape, band_limited=gal.psf.size > 1)
                out[comp.name] = self.convolve(img, None, gal)
            else:
                out[comp.name] = self.render_profile(prof, p, grid, grid.x.shape)
        return out

    # ------------------------------------------------------------------ statistics
    def chi2(self, values, gal: GalaxyArrays):
        return chi2(gal.image, self.render(values, gal), gal.sigma, gal.weight)

    def dof(self, gal: GalaxyArrays):
        """k = unmasked pixels − free parameters."""
        return jnp.sum(gal.weight) - self.n_free

    def loglike_from_chi2(self, chi2_value, gal: GalaxyArrays, likelihood: str | None = None):
        like = self.likelihood if likelihood is None else check_likelihood(likelihood)
        if like == "chi2":
            return chi2_distribution_loglike(chi2_value, self.dof(gal))
        return gaussian_loglike(chi2_value, gal.sigma, gal.weight)

    def residuals(self, values, gal: GalaxyArrays):
        """Whitened residuals √Ω (D − M)/σ, flattened: Σ residuals² = χ²."""
        r = jnp.sqrt(gal.weight) * (gal.image - self.render(values, gal)) / gal.sigma
        return r.reshape(-1)

    # ------------------------------------------------------------------ numpyro
    def sample_values(self, gal: GalaxyArrays):
        """Sample the free parameters (priors from bounds) and return every entry's value."""
        free_vals = []
        for j, i in enumerate(self.free):
            e = self.entries[i]
            lo, hi = gal.lo[j], gal.hi[j]
            if e.param.prior is not None:
                v = numpyro.sample(e.key, e.param.prior)
            elif e.log:
                u = numpyro.sample(e.key + "_log10", dist.Uniform(jnp.log10(lo), jnp.log10(hi)))
                v = numpyro.deterministic(e.key, jnp.power(10.0, u))
            else:
                v = numpyro.sample(e.key, dist.Uniform(lo, hi))
            free_vals.append(v)
        return jnp.asarray(gal.values0).at[jnp.asarray(self.free)].set(jnp.stack(free_vals))

    def numpyro_model(self, gal: GalaxyArrays, likelihood: str | None = None):
        """The numpyro model for one galaxy: bounded priors + pixel likelihood.

        Works under SVI, Laplace and NUTS; batch it by ``jax.vmap`` over ``gal``.
        ``likelihood=None`` uses the model's likelihood; ``"none"`` gives the prior only.
        """
        values = self.sample_values(gal)
        if likelihood == "none":
            return
        c2 = self.chi2(values, gal)
        numpyro.factor("loglike", self.loglike_from_chi2(c2, gal, likelihood))

    def site_values(self, values, gal: GalaxyArrays) -> dict:
        """Map an entry vector to the numpyro sample-site values (latent coordinates)."""
        out = {}
        for j, i in enumerate(self.free):
            e = self.entries[i]
            if e.log and e.param.prior is None:
                out[e.key + "_log10"] = jnp.log10(values[i])
            else:
                out[e.key] = values[i]
        return out

    def values_from_sites(self, sites: dict, gal: GalaxyArrays):
        """Inverse of :meth:`site_values`."""
        free_vals = []
        for i in self.free:
            e = self.entries[i]
            if e.log and e.param.prior is None:
                free_vals.append(jnp.power(10.0, sites[e.key + "_log10"]))
            else:
                free_vals.append(sites[e.key])
        return jnp.asarray(gal.values0).at[jnp.asarray(self.free)].set(jnp.stack(free_vals))

    def wrap_angles(self, values):
        """Wrap every angle entry into [-90°, 90°) (an ellipse is symmetric under 180°)."""
        values = np.array(values, dtype=np.float64, copy=True)
        for i, e in enumerate(self.entries):
            if e.spec.angle:
                values[..., i] = wrap_angle(values[..., i])
        return values


def pack_arrays(image, sigma, weight, psf, zp, scale, values0, lo, hi, *, psf_type=DEFAULT_PSF_TYPE,
                galaxy=None) -> GalaxyArrays:
    """A :class:`GalaxyArrays` from arrays (``psf`` normalised, ``psf_type`` checked): the
    kernel for pixel-integrated profiles, the PSF for point sources, both FFT'd on the padded
    canvas's FFT grid. Warns when an effective PSF is undersampled.

    Padding to a larger (bucket) stamp: the kernels are functions of the PSF image alone; the
    real-space kernel is ``irfft2(kernel_hat)[:ky + 2m, :kx + 2m]`` (m = DECONV_MARGIN), to be
    re-transformed with :func:`galbayes.psf.kernel_fft` at the bucket's
    :func:`galbayes.psf.canvas_fft_shape`; the stamp keeps its offset in the canvas."""
    psf = np.asarray(psf, np.float32)
    psf_type = check_psf_type(psf_type, galaxy=galaxy)
    if psf_type == "effective" and psf.size > 1:
        fwhm = psf_fwhm(psf)
        if fwhm < UNDERSAMPLED_FWHM:
            warnings.warn(f"the effective PSF of {galaxy or 'a galaxy'} has FWHM ≈ {fwhm:.2f} px < "
                          f"{UNDERSAMPLED_FWHM} px: it is undersampled, so dividing out the pixel response "
                          "is ill-conditioned and the model is approximate near the centre (check that "
                          "the PSF really is effective, i.e. includes the pixel; see README 'PSFs')",
                          UserWarning, stacklevel=3)
    shape = np.shape(image)
    fshape = canvas_fft_shape(shape, psf.shape)
    return GalaxyArrays(
        image=np.asarray(image, np.float32), sigma=np.asarray(sigma, np.float32),
        weight=np.asarray(weight, np.float32), psf=psf,
        psf_hat=kernel_fft(optical_kernel(psf, "optical"), fshape),
        kernel_hat=kernel_fft(optical_kernel(psf, psf_type), fshape),
        psf_kind=np.int32(PSF_TYPES.index(psf_type)),
        zp=np.float32(zp), scale=np.float32(scale), values0=np.asarray(values0, np.float32),
        lo=np.asarray(lo, np.float32), hi=np.asarray(hi, np.float32),
        centre=np.asarray([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0], np.float32))


def render_model(model: Model, obs: Observation, values: dict | None = None):
    """Convenience: the model image of ``obs``'s grid at ``values`` (defaults: initial values)."""
    gal = model.pack(obs, values, guess=False)
    gal = jax.tree_util.tree_map(jnp.asarray, gal)
    return np.asarray(model.render(gal.values0, gal))


def describe_model(model) -> dict:
    """Everything about a :class:`Model` that affects a fit, JSON-able.

    Components (name, profile and its parameter declarations and source code, PSF
    convolution), every parameter entry (initial value, bounds, fixed, log, prior, sharing),
    likelihood, size unit and pixel-integration settings. Comments and formatting of the
    recipe file do not matter.
    """
    comps = []
    for c in model.components:
        prof = model.profiles[c.name]
        comps.append({"name": c.name, "convolve": c.convolve, "profile": {
            "name": prof.name, "kind": prof.kind, "convolve": prof.convolve,
            "params": canon(list(prof.params)), "fn": canon(prof.fn)}})
    entries = [{"key": e.key, "spec": canon(e.spec), "log": e.log, "static_zero": e.static_zero,
                "param": {f: canon(getattr(e.param, f)) for f in ("init", "bounds", "fixed", "log", "prior")}}
               for e in model.entries]
    slots = {f"{c}.{p}": i for (c, p), i in sorted(model.slots.items())}
    return {"likelihood": model.likelihood, "size_unit": model.size_unit,
            "psf_type": getattr(model, "psf_type", None), "core": getattr(model, "core", True),
            "oversample": [list(o) for o in model.oversample], "components": comps,
            "entries": entries, "slots": slots}


def galbayes_code_only(model) -> bool:
    """Is everything the model's programs run galbayes' (or numpyro's) own code? Its profiles
    come from galbayes and its priors (if any) are numpyro distributions; then a traced
    program can be keyed by galbayes' source (:mod:`galbayes.traced`)."""
    for c in model.components:
        if not getattr(model.profiles[c.name].fn, "__module__", "").startswith("galbayes."):
            return False
    return all(e.param.prior is None or type(e.param.prior).__module__.startswith("numpyro.")
               for e in model.entries)

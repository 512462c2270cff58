"""The in-memory core of a fit, shared by :func:`galbayes.fit` and the catalog runner.

Galaxies packed by :meth:`Model.pack <galbayes.model.Model.pack>` are grouped by stamp/PSF
bucket (:mod:`galbayes.batching`), fitted through a fixed number of slots
(:func:`galbayes.inference.map.fit_map`), given error bars on request
(:func:`galbayes.inference.laplace_errors`, :func:`galbayes.inference.bootstrap_errors`)
and turned into result rows and image blocks. :mod:`galbayes.pipeline` (in-memory fits) and
:mod:`galbayes.runner` (catalog runs: shards, manifest, engines) both build on this module;
it imports neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .compiled import compiled
from .errors import InputError, ModelError, OptionsError
from .inference.map import MapOptions, MapResult, fit_map
from .model import GalaxyArrays, Model
from .psf import PSF_TYPES
from .results import safe_name, write_block
from .status import fit_status, input_error, with_notes

__all__ = ["render_batch", "default_batch_size", "ERROR_METHODS", "ErrorRequest", "ErrorEstimate",
           "FittedGalaxy"]


def render_batch(model: Model, batch: GalaxyArrays, values):
    """Model images and per-component images of a batch (vmapped, jitted)."""
    fn = compiled(model, ("render_batch",), lambda: jax.jit(jax.vmap(
        lambda v, g: (model.render(v, g), model.render_components(v, g)))))
    return fn(jnp.asarray(values, jnp.float32), jax.tree_util.tree_map(jnp.asarray, batch))


def default_batch_size() -> int:
    """Galaxies per jitted batch: 8 on a CPU, 256 on an accelerator.

    Under ``vmap`` every galaxy of a batch iterates until the slowest one has converged; on a
    CPU that waste outweighs the batching gain beyond ~16 galaxies (benchmarks/README.md),
    while a GPU needs large batches to be busy.
    """
    return 8 if jax.default_backend() == "cpu" else 256


ERROR_METHODS = ("none", "laplace", "jacobian", "bootstrap")


@dataclass(frozen=True)
class ErrorRequest:
    """Error bars asked of a catalog run: the method and where to write the covariances."""

    method: str
    covariance_dir: str | None = None


def _error_request(errors) -> ErrorRequest:
    """``errors`` (None, a method name or an :class:`ErrorRequest`) as an ErrorRequest, its
    method checked."""
    if isinstance(errors, ErrorRequest):
        method, cov_dir = errors.method or "none", errors.covariance_dir
    else:
        method, cov_dir = errors or "none", None
    if method not in ERROR_METHODS:
        raise OptionsError(f"errors must be one of {ERROR_METHODS}, got {method!r}")
    return ErrorRequest(method, cov_dir)


def _error_method(errors) -> str:
    return _error_request(errors).method


class ErrorEstimate(NamedTuple):
    """Error bars of a fitted group of galaxies (leading axis = galaxy), whichever method
    made them (:func:`_error_estimate`).

    method : {"laplace", "jacobian", "bootstrap"}
    errors : (B, E) 1σ error of every entry in user units (0 for fixed entries).
    covariance : (B, S, S) covariance of the free parameters (``model.free_keys`` order).
    flags : list of B strings, :data:`galbayes.status.OK` or the problems.
    """

    method: str
    errors: np.ndarray
    covariance: np.ndarray
    flags: list


class FittedGalaxy(NamedTuple):
    """One galaxy out of :func:`_fit_packed`: its own (unpadded) arrays, the padded group it
    was fitted in, its row ``j`` in the group's fit and error estimate."""

    gid: str
    gal: GalaxyArrays
    batch: GalaxyArrays
    j: int
    fit: MapResult
    errors: ErrorEstimate | None = None   # None when no error bars were asked for


def _error_estimate(model, batch, res, errors, options=None, batch_size=None) -> ErrorEstimate | None:
    """Error bars of a fitted batch (None for ``errors`` "none"): ``"laplace"`` = numpyro
    Laplace (Hessian), ``"jacobian"`` = the paper's (JᵀWJ)⁻¹, ``"bootstrap"`` = pixel
    bootstrap (galbayes.inference)."""
    method = _error_method(errors)
    if method == "none":
        return None
    from .inference import bootstrap_errors, laplace_errors

    if method == "bootstrap":
        est = bootstrap_errors(model, batch, res.values, options=options)
    else:
        est = laplace_errors(model, batch, res, method="hessian" if method == "laplace" else "jacobian",
                             batch_size=batch_size)
    return ErrorEstimate(method, est.errors, est.covariance, est.flags)


def _write_covariance(model, gid, est: ErrorEstimate, j, directory) -> None:
    from astropy.io import fits

    hdu = fits.PrimaryHDU(np.asarray(est.covariance[j], np.float64))
    hdu.header["METHOD"] = est.method
    hdu.header["FLAG"] = str(est.flags[j])[:68]
    for s, key in enumerate(model.free_keys):
        hdu.header[f"PAR{s}"] = key
    path = Path(directory) / f"{safe_name(gid)}.fits"
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path, overwrite=True)


def _fit_packed(model, packed: list, options: MapOptions, batch_size: int, errors=None, render: bool = True,
                streams: int | None = None):
    """Fit ``[(gid, GalaxyArrays)]`` grouped by stamp/PSF bucket (padded to it, see
    :func:`galbayes.batching.bucket_groups`), each group through ``batch_size`` slots (a finished galaxy's
    slot goes to the next waiting one, see :func:`fit_map`); yields a :class:`FittedGalaxy`
    per galaxy: its own (unpadded) arrays, the padded group, its row in the group's
    MapResult and error estimate. ``render`` adds the model and component images
    (bucket-sized) to the MapResult (on by default: the same program serves runs with and
    without blocks; the images cost about two renders per galaxy, ~2 % of its fit).

    ``errors`` (None, a method name or :class:`ErrorRequest`) adds an :class:`ErrorEstimate`
    to each group and, for a request with a ``covariance_dir``, writes ``<dir>/<id>.fits``.
    ``streams``: round drivers run at once (:func:`~galbayes.inference.map.fit_map`)."""
    from .batching import bucket_groups, slot_count, to_bucket

    request = _error_request(errors)
    # every galaxy padded to its group's stamp/PSF bucket (galbayes.batching): few compiled
    # shapes; a group too small for one batch rides in a larger bucket
    for (img, psf), items in bucket_groups(packed, min_group=batch_size):
        batch = Model.stack([to_bucket(g, img, psf) for _, g in items])
        slots = slot_count(len(items), batch_size)   # a partial group: the next power of two
        res = fit_map(model, batch, options=options, slots=slots, render=render, streams=streams)
        est = _error_estimate(model, batch, res, request, options, batch_size=slots)
        for j, (gid, gal) in enumerate(items):
            if est is not None and request.covariance_dir:
                _write_covariance(model, gid, est, j, request.covariance_dir)
            yield FittedGalaxy(gid, gal, batch, j, res, est)


def _result_row(model, fitted: FittedGalaxy) -> dict:
    """The result row of one fitted galaxy (values, χ², errors if estimated, status)."""
    gal, res, j, est = fitted.gal, fitted.fit, fitted.j, fitted.errors
    k = float(np.sum(gal.weight)) - model.n_free
    row = {"id": fitted.gid, "chi2": res.chi2[j], "chi2_red": res.chi2[j] / k if k > 0 else np.nan,
           "loglike": res.loglike[j], "n_iter": int(res.n_iter[j]), "converged": bool(res.converged[j])}
    row.update(zip(model.keys, res.values[j]))
    row["psf_type"] = PSF_TYPES[int(np.asarray(gal.psf_kind))]
    finite = np.all(np.isfinite(res.values[j])) and np.isfinite(res.chi2[j])
    if est is not None:
        row.update({k + "_err": v for k, v in zip(model.keys, est.errors[j])})
    row["status"] = fit_status(finite, None if est is None else est.flags[j])
    return row


def _input_notes(row: dict, obs) -> dict:
    """Append the Observation's notes (e.g. "sigma estimated from image ...") to a usable
    status of its result row (:func:`galbayes.status.with_notes`)."""
    if "status" in row:
        row["status"] = with_notes(row["status"], obs.notes)
    return row


def _load_chunk(model, rows):
    loaded = []
    for row in rows:
        try:
            obs = row.load()
            loaded.append((row, obs, model.pack(obs, row.init, bounds=row.bounds), None))
        except (InputError, ModelError) as exc:
            loaded.append((row, None, None, input_error(exc)))
    return loaded


def _write_blocks(model, fitted, results, obs_by_id, out_dir):
    by_batch: dict = {}
    for f in fitted:
        by_batch.setdefault(id(f.batch), (f.batch, f.fit, []))[2].append((f.gid, f.gal, f.j))
    for batch, res, members in by_batch.values():
        if res.images is not None:      # rendered by the fit's own program
            images, comps = res.images, res.components
        else:
            images, comps = render_batch(model, batch, np.nan_to_num(res.values))
        images = np.asarray(images)
        comps = {k: np.asarray(v) for k, v in comps.items()}
        for gid, gal, j in members:
            row, _ = obs_by_id[gid]
            header = dict(results[row.index])
            header["zp"] = float(gal.zp)
            ny, nx = np.shape(gal.image)     # the galaxy's own stamp, out of its bucket
            write_block(out_dir / "blocks" / f"{safe_name(gid)}.fits", data=gal.image,
                        model_image=images[j][:ny, :nx], sigma=gal.sigma, weight=gal.weight,
                        components={k: v[j][:ny, :nx] for k, v in comps.items()}, header_values=header)

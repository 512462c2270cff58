"""Catalog → batches → model → inference → results.

:func:`fit` fits in-memory :class:`~galbayes.data.Observation` objects (notebooks);
:func:`fit_catalog` streams a catalog file chunk by chunk (the next chunk's FITS files are
read on a background thread while the current one is fitted), writes ``results.fits``,
``results.csv`` and ``blocks/<id>.fits``, and never drops a galaxy: every input row gets
exactly one output row, in input order, with ``status`` = ``ok`` or what went wrong.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .data import Observation
from .errors import InputError, ModelError, OptionsError
from .inference.map import MapOptions, MapResult, fit_map
from .model import GalaxyArrays, Model
from .psf import PSF_TYPES
from .results import make_table, safe_name, write_block

__all__ = ["fit", "fit_catalog", "FitOutput", "render_batch"]


@dataclass
class FitOutput:
    """Results of :func:`fit`: the table plus, per fitted galaxy, its packed arrays."""

    table: object
    model: Model
    galaxies: dict = field(default_factory=dict)   # id -> GalaxyArrays (numpy)
    values: dict = field(default_factory=dict)     # id -> entry vector at the MAP
    covariance: dict = field(default_factory=dict)  # id -> (S, S) free-parameter covariance (errors=...)

    def row(self, galaxy_id) -> dict:
        t = self.table[list(self.table["id"]).index(str(galaxy_id))]
        return {c: t[c] for c in self.table.colnames}

    def params(self, galaxy_id) -> dict:
        r = self.row(galaxy_id)
        return {k: float(r[k]) for k in self.model.keys}


def render_batch(model: Model, batch: GalaxyArrays, values):
    """Model images and per-component images of a batch (vmapped, jitted)."""
    from .compiled import compiled

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


def _padded_size(n: int, batch_size: int) -> int:
    """Pad a partial batch to the next power of two (≤ batch_size): few distinct compiled shapes
    (:func:`galbayes.batching.slot_count`)."""
    from .batching import slot_count

    return slot_count(n, batch_size)


ERROR_METHODS = ("none", "laplace", "jacobian", "bootstrap")


@dataclass(frozen=True)
class ErrorRequest:
    """Error bars asked of a catalog run: the method and where to write the covariances."""

    method: str
    covariance_dir: str | None = None


def _error_method(errors) -> str:
    method = getattr(errors, "method", errors) or "none"
    if method not in ERROR_METHODS:
        raise OptionsError(f"errors must be one of {ERROR_METHODS}, got {method!r}")
    return method


def _with_errors(model, batch, res, errors, options=None, batch_size=None):
    """Attach error bars of a fitted batch to its MapResult (``err``, ``cov``, ``err_flags``):
    ``"laplace"`` = numpyro Laplace (Hessian), ``"jacobian"`` = the paper's (JᵀWJ)⁻¹,
    ``"bootstrap"`` = pixel bootstrap (galbayes.inference)."""
    method = _error_method(errors)
    if method == "none":
        return res
    from .inference import bootstrap_errors, laplace_errors

    if method == "bootstrap":
        est = bootstrap_errors(model, batch, res.values, options=options)
    else:
        est = laplace_errors(model, batch, res, method="hessian" if method == "laplace" else "jacobian",
                             batch_size=batch_size)
    out = _MapWithErrors(*res)
    out.err, out.cov, out.err_flags, out.err_method = est.errors, est.covariance, est.flags, method
    return out


class _MapWithErrors(MapResult):
    """A MapResult carrying error bars as attributes (see :func:`_with_errors`)."""


def _write_covariance(model, gid, res, j, directory) -> None:
    from astropy.io import fits

    hdu = fits.PrimaryHDU(np.asarray(res.cov[j], np.float64))
    hdu.header["METHOD"] = res.err_method
    hdu.header["FLAG"] = str(res.err_flags[j])[:68]
    for s, key in enumerate(model.free_keys):
        hdu.header[f"PAR{s}"] = key
    path = Path(directory) / f"{safe_name(gid)}.fits"
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path, overwrite=True)


def _fit_packed(model, packed: list, options: MapOptions, batch_size: int, errors=None, render: bool = True):
    """Fit ``[(gid, GalaxyArrays)]`` grouped by stamp/PSF bucket (padded to it, see
    :mod:`galbayes.batching`), each group through ``batch_size`` slots (a finished galaxy's
    slot goes to the next waiting one, see :func:`fit_map`); yields ``(gid, gal, group, j,
    res)`` per galaxy: its own (unpadded) arrays, the padded group, its row in the group's
    MapResult. ``render`` adds the model and component images (bucket-sized) to ``res``
    (on by default: the same program serves runs with and without blocks; the images cost
    about two renders per galaxy, ~2 % of its fit).

    ``errors`` (a method name or :class:`ErrorRequest`) adds error bars to each group's result
    and, for a request with a ``covariance_dir``, writes ``<dir>/<id>.fits``."""
    from .batching import bucketed, group_by_shape

    # every galaxy padded to its stamp/PSF bucket (galbayes.batching): few compiled shapes
    for items, padded in ((g, bucketed(g)) for g in group_by_shape(packed, buckets=True)):
        batch = Model.stack([g for _, g in padded])
        slots = _padded_size(len(items), batch_size)
        res = fit_map(model, batch, options=options, slots=slots, render=render)
        res = _with_errors(model, batch, res, errors, options, batch_size=slots)
        for j, (gid, gal) in enumerate(items):
            if getattr(errors, "covariance_dir", None) and hasattr(res, "cov"):
                _write_covariance(model, gid, res, j, errors.covariance_dir)
            yield gid, gal, batch, j, res


def _result_row(model, gid, gal, res, j, errors=None) -> dict:
    k = float(np.sum(gal.weight)) - model.n_free
    row = {"id": gid, "chi2": res.chi2[j], "chi2_red": res.chi2[j] / k if k > 0 else np.nan,
           "loglike": res.loglike[j], "n_iter": int(res.n_iter[j]), "converged": bool(res.converged[j])}
    row.update(zip(model.keys, res.values[j]))
    row["psf_type"] = PSF_TYPES[int(np.asarray(gal.psf_kind))]
    finite = np.all(np.isfinite(res.values[j])) and np.isfinite(res.chi2[j])
    row["status"] = "ok" if finite else "fit failed: non-finite parameters or chi2"
    if hasattr(res, "err"):
        row.update({k + "_err": v for k, v in zip(model.keys, res.err[j])})
        if res.err_flags[j] != "ok" and finite:
            row["status"] = f"ok; errors: {res.err_flags[j]}"
    return row


def _input_notes(row: dict, obs) -> dict:
    """Append the Observation's notes (e.g. "sigma estimated from image ...") to an ``ok``
    status of its result row."""
    notes = getattr(obs, "notes", None)
    if notes and str(row.get("status", "")).startswith("ok"):
        row["status"] = "; ".join([row["status"]] + list(notes))
    return row


def fit(model: Model, observations, *, init=None, options: MapOptions | None = None,
        batch_size: int | None = None, errors: str = "none", psf_type: str | None = None,
        **option_kw) -> FitOutput:
    """Fit in-memory galaxies (MAP: SVI + optax, LM polish).

    Parameters
    ----------
    model : Model
    observations : Observation or list of Observation
        Galaxies (ids default to their position).
    init : dict or list of dict, optional
        Per-galaxy initial values keyed ``<component>_<param>``.
    options : MapOptions, optional
        Fitter settings; keyword arguments override fields.
    batch_size : int, optional
        Galaxies per jitted batch (default :func:`default_batch_size`).
    errors : {"none", "laplace", "jacobian", "bootstrap"}
        Error bars: ``<key>_err`` columns and ``FitOutput.covariance[id]`` (numpyro Laplace,
        the paper's (JᵀWJ)⁻¹, or the pixel bootstrap; see :mod:`galbayes.inference`). A
        flagged covariance makes the status ``"ok; errors: <flag>"``.
    psf_type : {"effective", "optical"}, optional
        PSF kind for galaxies whose Observation does not give one (overrides the model's;
        default "effective", see :mod:`galbayes.psf`).
    """
    _error_method(errors)
    if psf_type is not None:   # a shallow copy: the caller's model keeps its own setting
        import copy

        from .psf import check_psf_type
        model = copy.copy(model)
        model.psf_type = check_psf_type(psf_type)
    if isinstance(observations, Observation):
        observations = [observations]
    inits = init if isinstance(init, (list, tuple)) else [init] * len(observations)
    opts = options or MapOptions()
    if option_kw:
        opts = MapOptions(**{**opts.__dict__, **option_kw})
    rows, packed, out = {}, [], FitOutput(table=None, model=model)
    by_id = {}
    order = []
    for i, (obs, ini) in enumerate(zip(observations, inits)):
        gid = obs.id if obs.id is not None else str(i)
        if gid in rows or gid in order:
            raise InputError(f"duplicate galaxy id {gid!r} (observations {order.index(gid)} and {i}); "
                             "ids must be unique")
        order.append(gid)
        try:
            gal = model.pack(obs, ini)
        except (InputError, ModelError) as exc:
            rows[gid] = {"id": gid, "status": f"error: {exc}"}
            continue
        packed.append((gid, gal))
        by_id[gid] = obs
    batch_size = batch_size or default_batch_size()
    for gid, gal, _, j, res in _fit_packed(model, packed, opts, batch_size, errors=errors):
        rows[gid] = _input_notes(_result_row(model, gid, gal, res, j), by_id[gid])
        out.galaxies[gid] = gal
        out.values[gid] = res.values[j]
        if hasattr(res, "cov"):
            out.covariance[gid] = res.cov[j]
    out.table = make_table(model, [rows[g] for g in order], errors=_error_method(errors) != "none")
    return out


def _load_chunk(model, rows):
    loaded = []
    for row in rows:
        try:
            obs = row.load()
            loaded.append((row, obs, model.pack(obs, row.init), None))
        except (InputError, ModelError) as exc:
            loaded.append((row, None, None, f"error: {exc}"))
    return loaded


def fit_catalog(catalog, model: Model, out_dir, *, options: MapOptions | None = None,
                batch_size: int | None = None, chunk_size: int | None = None, blocks: bool = True,
                progress: bool = True, resume: bool = False, shard_size: int | None = None,
                dask=None, errors: str = "none", **option_kw):
    """Fit every galaxy of a catalog file and write the results into ``out_dir``.

    Parameters
    ----------
    catalog : str or Path
        CSV/ECSV/FITS table (see :mod:`galbayes.catalog`).
    model : Model
    out_dir : str or Path
        Gets ``results.fits``, ``results.csv``, ``blocks/<id>.fits``, and the run's
        ``manifest.json`` and ``shards/`` (see :mod:`galbayes.runner`).
    batch_size : int, optional
        Galaxies per jitted batch (default :func:`default_batch_size`).
    chunk_size : int, optional
        Old name of ``shard_size`` (used when ``shard_size`` is not given).
    blocks : bool
        Write the image blocks.
    resume : bool
        Continue an interrupted run in ``out_dir`` (refused if the catalog, recipe or
        options changed).
    shard_size : int, optional
        Catalog rows per durable shard (default ``8 × batch_size``); the next shard's
        images are read on a background thread while this one is fitted.
    dask : str or distributed.Client, optional
        Fit the shards on a Dask cluster: a scheduler address or ``"local:N"``.
    errors : {"none", "laplace", "jacobian", "bootstrap"}
        Error bars (see :func:`fit`): ``<key>_err`` columns, and the free-parameter
        covariance of each galaxy in ``out_dir/covariance/<id>.fits`` (header ``PARi`` =
        parameter names, ``FLAG``).

    ``out_dir/run.json`` records the catalog and recipe paths (for ``galbayes sample``).

    Returns
    -------
    astropy.table.Table
        The results table (also written to disk).
    """
    opts = options or MapOptions()
    if option_kw:
        opts = MapOptions(**{**opts.__dict__, **option_kw})
    from .runner import run_catalog

    method = _error_method(errors)
    request = None
    if method != "none":
        cov_dir = Path(out_dir).resolve() / "covariance"
        if not resume and cov_dir.is_dir():
            for old in cov_dir.glob("*.fits"):
                old.unlink()
        request = ErrorRequest(method, str(cov_dir))
    batch_size = batch_size or default_batch_size()
    from . import cache

    cache.ensure()
    stats = cache.compile_stats()
    before, t0 = stats.snapshot(), time.perf_counter()
    table = run_catalog(catalog, model, out_dir, options=opts, batch_size=batch_size,
                        shard_size=shard_size or chunk_size, blocks=blocks, progress=progress,
                        resume=resume, dask=dask, errors=request)
    after = stats.snapshot()
    timing = {"wall_s": round(time.perf_counter() - t0, 3), "cache_dir": str(cache.cache_dir() or ""),
              **{k: round(after[k] - before[k], 3) for k in after}}
    _write_run_info(out_dir, catalog, model, method, timing)
    return table


def _write_run_info(out_dir, catalog, model, errors: str, timing: dict | None = None) -> None:
    """``out_dir/run.json``: what ``galbayes sample`` needs to rebuild the model and data, and
    the run's timing (wall time; XLA compilations, cache hits and seconds compiling/tracing
    in this process — Dask workers compile on their own)."""
    import json

    info = {"catalog": str(Path(catalog).resolve()), "recipe": getattr(model, "source", None),
            "likelihood": model.likelihood, "size_unit": model.size_unit, "errors": errors,
            "free_keys": list(model.free_keys)}
    if timing:
        info["timing"] = timing
    (Path(out_dir) / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def _write_blocks(model, fitted, results, obs_by_id, out_dir):
    by_batch: dict = {}
    for gid, gal, batch, j, res in fitted:
        by_batch.setdefault(id(batch), (batch, res, []))[2].append((gid, gal, j))
    for batch, res, members in by_batch.values():
        if getattr(res, "images", None) is not None:      # rendered by the fit's own program
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

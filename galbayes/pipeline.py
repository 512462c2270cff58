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

from . import cache, traced
from .data import Observation
from .errors import InputError, ModelError
from .fitting import (ERROR_METHODS, ErrorEstimate, ErrorRequest, FittedGalaxy, _error_method, _fit_packed,  # noqa: F401
                      _input_notes, _result_row, default_batch_size, render_batch)
from .inference.map import MapOptions
from .model import Model
from .results import make_table
from .runner import run_catalog
from .status import input_error

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


def fit(model: Model, observations, *, init=None, bounds=None, options: MapOptions | None = None,
        batch_size: int | None = None, errors: str = "none", psf_type: str | None = None,
        streams: int | None = None, **option_kw) -> FitOutput:
    """Fit in-memory galaxies (MAP: SVI + optax, LM polish).

    Parameters
    ----------
    model : Model
    observations : Observation or list of Observation
        Galaxies (ids default to their position).
    init : dict or list of dict, optional
        Per-galaxy initial values keyed ``<component>_<param>``.
    bounds : dict or list of dict, optional
        Per-galaxy bounds ``{key: (lo, hi)}`` (None for "the model's"), replacing the model's
        bounds and uniform prior of those free parameters (:meth:`Model.initial_values`).
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
    streams : int, optional
        Round drivers run at once on a CPU (default
        :func:`~galbayes.inference.map.default_streams`: its cores; see
        :func:`~galbayes.inference.map.fit_map`). The results depend on it only at float32 rounding.
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
    limits = bounds if isinstance(bounds, (list, tuple)) else [bounds] * len(observations)
    for name, given in (("init", inits), ("bounds", limits)):
        if len(given) != len(observations):
            raise InputError(f"{len(given)} {name} entries for {len(observations)} observations", what=name)
    opts = options or MapOptions()
    if option_kw:
        opts = MapOptions(**{**opts.__dict__, **option_kw})
    rows, packed, out = {}, [], FitOutput(table=None, model=model)
    by_id = {}
    order = []
    for i, (obs, ini, lim) in enumerate(zip(observations, inits, limits)):
        gid = obs.id if obs.id is not None else str(i)
        if gid in rows or gid in order:
            raise InputError(f"duplicate galaxy id {gid!r} (observations {order.index(gid)} and {i}); "
                             "ids must be unique")
        order.append(gid)
        try:
            gal = model.pack(obs, ini, bounds=lim)
        except (InputError, ModelError) as exc:
            rows[gid] = {"id": gid, "status": input_error(exc)}
            continue
        packed.append((gid, gal))
        by_id[gid] = obs
    batch_size = batch_size or default_batch_size()
    for f in _fit_packed(model, packed, opts, batch_size, errors=errors, streams=streams):
        rows[f.gid] = _input_notes(_result_row(model, f), by_id[f.gid])
        out.galaxies[f.gid] = f.gal
        out.values[f.gid] = f.fit.values[f.j]
        if f.errors is not None:
            out.covariance[f.gid] = f.errors.covariance[f.j]
    out.table = make_table(model, [rows[g] for g in order], errors=_error_method(errors) != "none")
    return out


def fit_catalog(catalog, model: Model, out_dir, *, options: MapOptions | None = None,
                batch_size: int | None = None, chunk_size: int | None = None, blocks: bool = True,
                progress: bool = True, resume: bool = False, shard_size: int | None = None,
                dask=None, errors: str = "none", streams: int | None = None, **option_kw):
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
        Catalog rows per durable shard (default ``8 × batch_size``, at least 256 without
        ``dask``: :func:`galbayes.runner.default_shard_size`); the next shard's
        images are read on a background thread while this one is fitted.
    dask : str or distributed.Client, optional
        Fit the shards on a Dask cluster: a scheduler address or ``"local:N"``.
    errors : {"none", "laplace", "jacobian", "bootstrap"}
        Error bars (see :func:`fit`): ``<key>_err`` columns, and the free-parameter
        covariance of each galaxy in ``out_dir/covariance/<id>.fits`` (header ``PARi`` =
        parameter names, ``FLAG``).
    streams : int, optional
        Round drivers run at once in this process (default: the CPU cores, 1 on an
        accelerator; 1 in each Dask worker unless given; see
        :func:`~galbayes.inference.map.fit_map`). The results depend on it only at float32 rounding.

    ``out_dir/run.json`` records the catalog and recipe paths (for ``galbayes sample``).

    Returns
    -------
    astropy.table.Table
        The results table (also written to disk).
    """
    opts = options or MapOptions()
    if option_kw:
        opts = MapOptions(**{**opts.__dict__, **option_kw})
    method = _error_method(errors)
    request = None
    if method != "none":
        cov_dir = Path(out_dir).resolve() / "covariance"
        if not resume and cov_dir.is_dir():
            for old in cov_dir.glob("*.fits"):
                old.unlink()
        request = ErrorRequest(method, str(cov_dir))
    batch_size = batch_size or default_batch_size()
    cache.ensure()
    stats = cache.compile_stats()
    before, t0 = {**stats.snapshot(), **traced.totals()}, time.perf_counter()
    table = run_catalog(catalog, model, out_dir, options=opts, batch_size=batch_size,
                        shard_size=shard_size or chunk_size, blocks=blocks, progress=progress,
                        resume=resume, dask=dask, errors=request, streams=streams)
    after = {**stats.snapshot(), **traced.totals()}
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
            "likelihood": model.likelihood, "psf_type": model.psf_type, "size_unit": model.size_unit,
            "errors": errors,
            "free_keys": list(model.free_keys)}
    if timing:
        info["timing"] = timing
    (Path(out_dir) / "run.json").write_text(json.dumps(info, indent=2) + "\n")



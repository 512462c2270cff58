"""Catalog → batches → model → inference → results.

:func:`fit` fits in-memory :class:`~galbayes.data.Observation` objects (notebooks);
:func:`fit_catalog` streams a catalog file chunk by chunk (the next chunk's FITS files are
read on a background thread while the current one is fitted), writes ``results.fits``,
``results.csv`` and ``blocks/<id>.fits``, and never drops a galaxy: every input row gets
exactly one output row, in input order, with ``status`` = ``ok`` or what went wrong.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .catalog import read_catalog
from .data import Observation
from .errors import InputError, ModelError
from .inference.map import MapOptions, fit_map
from .model import GalaxyArrays, Model
from .results import make_table, safe_name, write_block, write_table

__all__ = ["fit", "fit_catalog", "FitOutput", "render_batch"]


@dataclass
class FitOutput:
    """Results of :func:`fit`: the table plus, per fitted galaxy, its packed arrays."""

    table: object
    model: Model
    galaxies: dict = field(default_factory=dict)   # id -> GalaxyArrays (numpy)
    values: dict = field(default_factory=dict)     # id -> entry vector at the MAP

    def row(self, galaxy_id) -> dict:
        t = self.table[list(self.table["id"]).index(str(galaxy_id))]
        return {c: t[c] for c in self.table.colnames}

    def params(self, galaxy_id) -> dict:
        r = self.row(galaxy_id)
        return {k: float(r[k]) for k in self.model.keys}


_RENDER_CACHE: dict = {}


def render_batch(model: Model, batch: GalaxyArrays, values):
    """Model images and per-component images of a batch (vmapped, jitted)."""
    key = id(model)
    if key not in _RENDER_CACHE:
        fn = jax.jit(jax.vmap(lambda v, g: (model.render(v, g), model.render_components(v, g))))
        _RENDER_CACHE[key] = (model, fn)
    return _RENDER_CACHE[key][1](jnp.asarray(values, jnp.float32), jax.tree_util.tree_map(jnp.asarray, batch))


def _pad(items: list, size: int) -> list:
    return items + [items[-1]] * (size - len(items))


def _padded_size(n: int, batch_size: int) -> int:
    """Pad a partial batch to the next power of two (≤ batch_size): few distinct compiled shapes."""
    size = 1
    while size < n:
        size *= 2
    return min(size, batch_size)


def _fit_packed(model, packed: list, options: MapOptions, batch_size: int):
    """Fit ``[(gid, GalaxyArrays)]`` grouped by shape in fixed-size batches; yields per galaxy."""
    groups: dict = {}
    for gid, gal in packed:
        groups.setdefault((gal.image.shape, gal.psf.shape), []).append((gid, gal))
    for items in groups.values():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            size = _padded_size(len(chunk), batch_size)
            batch = Model.stack(_pad([g for _, g in chunk], size))
            res = fit_map(model, batch, options=options)
            for j, (gid, gal) in enumerate(chunk):
                yield gid, gal, batch, j, res


def _result_row(model, gid, gal, res, j) -> dict:
    k = float(np.sum(gal.weight)) - model.n_free
    row = {"id": gid, "chi2": res.chi2[j], "chi2_red": res.chi2[j] / k if k > 0 else np.nan,
           "loglike": res.loglike[j], "n_iter": int(res.n_iter[j]), "converged": bool(res.converged[j])}
    row.update(zip(model.keys, res.values[j]))
    finite = np.all(np.isfinite(res.values[j])) and np.isfinite(res.chi2[j])
    row["status"] = "ok" if finite else "fit failed: non-finite parameters or chi2"
    return row


def fit(model: Model, observations, *, init=None, options: MapOptions | None = None,
        batch_size: int = 64, **option_kw) -> FitOutput:
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
    batch_size : int
        Galaxies per jitted batch.
    """
    if isinstance(observations, Observation):
        observations = [observations]
    inits = init if isinstance(init, (list, tuple)) else [init] * len(observations)
    opts = options or MapOptions()
    if option_kw:
        opts = MapOptions(**{**opts.__dict__, **option_kw})
    rows, packed, out = {}, [], FitOutput(table=None, model=model)
    order = []
    for i, (obs, ini) in enumerate(zip(observations, inits)):
        gid = obs.id if obs.id is not None else str(i)
        order.append(gid)
        try:
            gal = model.pack(obs, ini)
        except (InputError, ModelError) as exc:
            rows[gid] = {"id": gid, "status": f"error: {exc}"}
            continue
        packed.append((gid, gal))
    for gid, gal, _, j, res in _fit_packed(model, packed, opts, batch_size):
        rows[gid] = _result_row(model, gid, gal, res, j)
        out.galaxies[gid] = gal
        out.values[gid] = res.values[j]
    out.table = make_table(model, [rows[g] for g in order])
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
                batch_size: int = 64, chunk_size: int | None = None, blocks: bool = True,
                progress: bool = True, resume: bool = False, shard_size: int | None = None,
                dask=None, **option_kw):
    """Fit every galaxy of a catalog file and write the results into ``out_dir``.

    Parameters
    ----------
    catalog : str or Path
        CSV/ECSV/FITS table (see :mod:`galbayes.catalog`).
    model : Model
    out_dir : str or Path
        Gets ``results.fits``, ``results.csv``, ``blocks/<id>.fits``, and the run's
        ``manifest.json`` and ``shards/`` (see :mod:`galbayes.runner`).
    batch_size : int
        Galaxies per jitted batch.
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

    Returns
    -------
    astropy.table.Table
        The results table (also written to disk).
    """
    opts = options or MapOptions()
    if option_kw:
        opts = MapOptions(**{**opts.__dict__, **option_kw})
    from .runner import run_catalog

    return run_catalog(catalog, model, out_dir, options=opts, batch_size=batch_size,
                       shard_size=shard_size or chunk_size, blocks=blocks, progress=progress,
                       resume=resume, dask=dask)


def _write_blocks(model, fitted, results, obs_by_id, out_dir):
    by_batch: dict = {}
    for gid, gal, batch, j, res in fitted:
        by_batch.setdefault(id(batch), (batch, res, []))[2].append((gid, gal, j))
    for batch, res, members in by_batch.values():
        images, comps = render_batch(model, batch, np.nan_to_num(res.values))
        images = np.asarray(images)
        comps = {k: np.asarray(v) for k, v in comps.items()}
        for gid, gal, j in members:
            row, _ = obs_by_id[gid]
            header = dict(results[row.index])
            header["zp"] = float(gal.zp)
            write_block(out_dir / "blocks" / f"{safe_name(gid)}.fits", data=gal.image,
                        model_image=images[j], sigma=gal.sigma, weight=gal.weight,
                        components={k: v[j] for k, v in comps.items()}, header_values=header)

"""NUTS for chosen galaxies of a ``galbayes fit`` results folder (``galbayes sample``).

The results-folder driver above the sampler: it reads ``run.json`` (catalog and recipe),
``results.fits`` (each galaxy's MAP, the starting point) and the chosen galaxies' images,
runs :func:`galbayes.inference.nuts.run_nuts` and writes ``posteriors/<id>.nc`` and
``posterior_summary.csv``. The sampler itself (:mod:`galbayes.inference.nuts`) knows nothing
of catalogs, recipes or folders.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from .batching import group_by_shape
from .catalog import read_catalog
from .errors import InputError, ModelError
from .inference.nuts import run_nuts, save_posteriors, summary_rows
from .model import Model
from .recipe import load_recipe
from .status import is_usable

__all__ = ["sample_results"]

_OPS = {"<=": np.less_equal, ">=": np.greater_equal, "==": np.equal, "!=": np.not_equal,
        "<": np.less, ">": np.greater}


def _row_indices(rows, n_rows: int) -> np.ndarray:
    """0-based row indices from a boolean mask (length ``n_rows``) or an index list."""
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (n_rows,):
            raise InputError(f"row mask has shape {rows.shape}; results.fits has {n_rows} rows", what="rows")
        return np.flatnonzero(rows)
    if rows.size and not np.issubdtype(rows.dtype, np.integer):
        raise InputError(f"rows must be a boolean mask or integer indices, got dtype {rows.dtype}", what="rows")
    rows = rows.astype(int).ravel()
    bad = rows[(rows < 0) | (rows >= n_rows)]
    if bad.size:
        raise InputError(f"row indices {bad.tolist()} outside 0..{n_rows - 1}", what="rows")
    return rows


def _where_mask(table, where: str) -> np.ndarray:
    """Boolean mask of ``table`` rows meeting ``"COLUMN OP VALUE"``."""
    import re

    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*", where)
    if m is None:
        raise InputError(f"cannot read {where!r}: expected 'COLUMN OP VALUE', OP one of < <= > >= == !=",
                         what="where")
    col, op, raw = m.groups()
    if col not in table.colnames:
        raise InputError(f"{where!r}: results.fits has no column {col!r} (columns: {', '.join(table.colnames)})",
                         what="where")
    values = np.asarray(table[col])
    if values.dtype.kind in "fiu":
        try:
            ref = float(raw)
        except ValueError:
            raise InputError(f"{where!r}: {col} is numeric but {raw!r} is not a number", what="where") from None
        with np.errstate(invalid="ignore"):
            return _OPS[op](values.astype(float), ref) & np.isfinite(values.astype(float))
    return _OPS[op](values.astype(str), raw.strip("'\""))


def fit_model(run: dict):
    """The model a ``galbayes fit`` run used, from its ``run.json``: the recipe with the
    run's likelihood and PSF kind (``--psf-type``; older runs without it: the recipe's)."""
    return load_recipe(run["recipe"], likelihood=run.get("likelihood"), psf_type=run.get("psf_type"))


def sample_results(results_dir, *, ids=None, worst: int | None = None, rows=None, where: str | None = None,
                   chains: int = 4, draws: int = 1000, warmup: int = 500, seed: int = 0,
                   likelihood: str = "gaussian", batch_size: int | None = None,
                   log_likelihood: bool = False):
    """NUTS for chosen galaxies of a ``galbayes fit`` output folder (``galbayes sample``).

    Reads ``results_dir/run.json`` (catalog and recipe, written by
    :func:`galbayes.pipeline.fit_catalog`) and ``results.fits`` (the MAP of each galaxy, the
    starting point), re-reads the chosen galaxies' images, runs :func:`~galbayes.inference.nuts.run_nuts` and writes
    ``results_dir/posteriors/<id>.nc`` (ArviZ netCDF, parameters in user units) and
    ``results_dir/posterior_summary.csv`` (one row per galaxy and free parameter: mean, sd,
    r_hat, ess_bulk, divergences; rows of galaxies sampled earlier are kept).

    Parameters
    ----------
    ids : list of str, optional
        Galaxies to sample.
    worst : int, optional
        And/or: the ``worst`` usable galaxies (:func:`galbayes.status.is_usable`: status
        ``ok`` or ``ok; …``) with the highest reduced χ².
    rows : array of bool or int, optional
        And/or: a row mask over ``results.fits`` (length = its number of rows) or 0-based
        row indices.
    where : str, optional
        And/or: rows of ``results.fits`` meeting ``"COLUMN OP VALUE"`` with OP one of
        ``< <= > >= == !=`` (e.g. ``"sersic_n > 4"``, ``"chi2_red>1.5"``).

    The selections are combined (union), in results order within each, without duplicates.
    batch_size : int, optional
        Galaxies whose chains run together. Default: 1 on CPU (where the vectorised batch
        waits for its deepest tree and a CPU gains nothing from wider vectors:
        ``benchmarks/bench_errors.py`` measured 0.6× the throughput of one galaxy at a time
        with 8 galaxies), 16 on GPU/TPU.
    log_likelihood : bool
        Also store each draw's per-pixel Gaussian log-likelihood in ``posteriors/<id>.nc``
        (a ``log_likelihood`` group, for PSIS-LOO in ``galbayes compare``; large: n_pix ×
        chains × draws float32). Needs ``likelihood="gaussian"``.

    Returns
    -------
    (astropy.table.Table of the summary rows written now, dict id → problem for skipped ids)
    """
    from astropy.table import Table, vstack

    if batch_size is None:
        batch_size = 1 if jax.default_backend() == "cpu" else 16
    if log_likelihood and likelihood != "gaussian":
        raise InputError("pointwise log-likelihoods (for PSIS-LOO) need likelihood='gaussian': the chi2 "
                         "likelihood does not split into pixels", what="log_likelihood")
    results_dir = Path(results_dir)
    run_path = results_dir / "run.json"
    if not run_path.is_file():
        raise InputError(f"{run_path} not found: sample needs a folder written by 'galbayes fit'",
                         what="RESULTS_DIR")
    run = json.loads(run_path.read_text())
    if not run.get("recipe"):
        raise ModelError(f"{run_path}: the fit was made with a model built in Python (no recipe file)")
    model = fit_model(run)
    table = Table.read(results_dir / "results.fits")
    status = [str(s) for s in table["status"]]
    by_id = {str(r["id"]): r for r in table}
    skipped = {}
    chosen = [str(i) for i in (ids or [])]
    if worst is not None:
        good = [i for i, s in enumerate(status) if is_usable(s)]
        good.sort(key=lambda i: -float(table["chi2_red"][i]))
        chosen += [str(table["id"][i]) for i in good[:worst]]
    if rows is not None:
        chosen += [str(table["id"][i]) for i in _row_indices(rows, len(table))]
    if where is not None:
        chosen += [str(table["id"][i]) for i in np.flatnonzero(_where_mask(table, where))]
    ids = list(dict.fromkeys(chosen))
    for gid in ids:
        if gid not in by_id:
            skipped[gid] = "not in results.fits"
        elif not is_usable(by_id[gid]["status"]):
            skipped[gid] = f"its MAP fit failed ({by_id[gid]['status']})"
    wanted = [g for g in ids if g not in skipped]
    rows = {r.id: r for r in read_catalog(run["catalog"], model=model) if r.id in set(wanted)}
    packed = []
    for gid in wanted:
        if gid not in rows:
            skipped[gid] = "not in the catalog"
            continue
        try:
            obs = rows[gid].load()
            init = {k: float(by_id[gid][k]) for k in model.keys}
            packed.append((gid, model.pack(obs, init, bounds=rows[gid].bounds)))   # the fit's priors
        except (InputError, ModelError) as exc:
            skipped[gid] = str(exc)
    summary = []
    for items in group_by_shape(packed):
        gids = [g for g, _ in items]
        batch = Model.stack([g for _, g in items])
        res = run_nuts(model, batch, np.asarray(batch.values0, np.float64), chains=chains, draws=draws,
                       warmup=warmup, seed=seed, likelihood=likelihood, batch_size=batch_size)
        save_posteriors(model, res, gids, results_dir / "posteriors",
                        map_values=np.asarray(batch.values0, np.float64),
                        batch=batch if log_likelihood else None)
        summary.extend(summary_rows(res, gids))
    new = Table(rows=summary, names=["id", "param", "mean", "sd", "r_hat", "ess_bulk", "divergences"]) \
        if summary else Table(names=["id", "param", "mean", "sd", "r_hat", "ess_bulk", "divergences"],
                              dtype=[str, str, float, float, float, float, int])
    path = results_dir / "posterior_summary.csv"
    out = new
    if path.is_file() and len(new):
        old = Table.read(path, format="ascii.csv")
        keep = [str(i) not in set(new["id"]) for i in old["id"]]
        if any(keep):
            old = old[keep]
            old["id"] = old["id"].astype(str)
            out = vstack([old, new])
    if len(new):
        out.write(path, format="ascii.csv", overwrite=True)
    return new, skipped

"""Model choice between runs of one catalog with different recipes (``galbayes compare``).

For every galaxy and every run (a ``galbayes fit`` output folder), at the MAP:

* ``chi2``: χ² = Σ Ω (D − M)² / σ² from ``results.fits``;
* ``k``: the recipe's number of free parameters (``run.json`` → recipe);
* ``n_pix``: unmasked pixels, recovered from the degrees of freedom the fit wrote,
  ``chi2_red = chi2 / (n_pix − k)``, i.e. ``n_pix = chi2 / chi2_red + k``;
* ``BIC = χ² + k ln n_pix`` and ``AIC = χ² + 2k``.

Both criteria are −2 ln L̂ + penalty for the Gaussian pixel likelihood, whose
−2 ln L = χ² + Σ Ω ln(2πσ²): the second term is the same for every model of the same pixels
and σ map, so it drops out of every difference and is left out. (The MAP of galbayes is the
χ² minimum whichever likelihood the run used, see :mod:`galbayes.inference.map`, so the
criteria are comparable across runs made with ``chi2`` and ``gaussian`` likelihoods.) The
preferred recipe (``preferred``) has the lowest BIC; ``delta_bic`` is the BIC of the next
best recipe minus the preferred one's (≥ 0; ≳ 6 "strong", ≳ 10 "very strong" on the Kass &
Raftery scale). ``preferred_aic`` is the AIC choice.

PSIS-LOO (``elpd_loo_<run>``, ``elpd_loo_se_<run>``, ``preferred_loo``) comes from arviz
(:func:`arviz.loo`, pixels as the observations) for galaxies with a NUTS posterior
``posteriors/<id>.nc`` (``galbayes sample``) that holds a ``log_likelihood`` group (pointwise,
per-pixel log-likelihoods of every draw): ``galbayes sample --log-likelihood`` stores it
(:func:`galbayes.inference.nuts.pointwise_loglike`; opt-in, as it is n_pix × chains × draws
float32 numbers, ~260 MB for a 128² stamp and 4 × 1000 draws). Elsewhere the LOO columns are
NaN; a posterior without the group is said so in ``note``, and Pareto k > 0.7 warnings too.

A galaxy whose fit in a run is not usable (:func:`galbayes.status.is_usable`: status ``ok``
or ``ok; …``) is left out of that run's comparison (its columns NaN) and the ``note`` column
says so; the preference is made among the remaining runs.
Runs over different catalogs (different sets of ids) are refused.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, ModelError
from .status import is_usable

__all__ = ["compare_runs", "read_run"]


def _label(run_dir: Path, recipe) -> str:
    base = Path(recipe).stem if recipe else run_dir.name
    return re.sub(r"[^A-Za-z0-9_]", "_", base) or "run"


def read_run(run_dir) -> dict:
    """One run folder: ``{"dir", "recipe", "k", "free_keys", "table"}`` (raises
    :class:`~galbayes.errors.InputError` for a folder that is not a finished ``galbayes fit``
    output, :class:`~galbayes.errors.ModelError` when the model cannot be rebuilt)."""
    from astropy.table import Table

    run_dir = Path(run_dir)
    res = run_dir / "results.fits"
    info_path = run_dir / "run.json"
    if not res.is_file():
        raise InputError(f"{res} not found: compare needs folders written by 'galbayes fit'", what="RUN_DIR")
    if not info_path.is_file():
        raise InputError(f"{info_path} not found: compare needs folders written by 'galbayes fit'",
                         what="RUN_DIR")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {info_path}: {exc}", what="RUN_DIR") from None
    recipe = info.get("recipe")
    if info.get("free_keys") is not None:
        free_keys = list(info["free_keys"])
    elif recipe:
        from .recipe import load_recipe

        free_keys = list(load_recipe(recipe).free_keys)
    else:
        raise ModelError(f"{info_path}: the fit was made with a model built in Python (no recipe "
                         "file, no free_keys): its number of free parameters is unknown")
    try:
        table = Table.read(res)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {res}: {exc}", what="RUN_DIR") from None
    missing = [c for c in ("id", "chi2", "chi2_red", "status") if c not in table.colnames]
    if missing:
        raise InputError(f"{res} has no column(s) {missing}", what="RUN_DIR")
    return {"dir": run_dir, "recipe": recipe, "k": len(free_keys), "free_keys": free_keys, "table": table}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _num(v) -> float:
    """A table cell as a float (a masked cell → NaN)."""
    return math.nan if np.ma.is_masked(v) else float(v)


def _loo(path: Path):
    """``(elpd_loo, se, problem)`` from an ArviZ netCDF posterior, or NaNs and why not."""
    import arviz as az

    try:
        idata = az.from_netcdf(str(path))
    except Exception as exc:  # noqa: BLE001  (netCDF/xarray raise many types)
        return math.nan, math.nan, f"cannot read {path.name}: {exc}"
    if "log_likelihood" not in idata.groups():
        return math.nan, math.nan, "no pointwise log-likelihood in its posterior"
    names = list(idata.log_likelihood.data_vars)
    try:
        with warnings.catch_warnings():   # the Pareto k warning goes to the note instead
            warnings.simplefilter("ignore", UserWarning)
            elpd = az.loo(idata, var_name=names[0] if len(names) == 1 else None)
    except Exception as exc:  # noqa: BLE001
        return math.nan, math.nan, f"PSIS-LOO failed: {exc}"
    problem = "PSIS-LOO: Pareto k > 0.7 for some pixels" if getattr(elpd, "warning", False) else ""
    return float(elpd["elpd_loo"]), float(elpd["se"]), problem


def compare_runs(run_dirs, *, out=None, loo: bool = True):
    """Per-galaxy model choice between runs of one catalog (see the module docstring).

    Parameters
    ----------
    run_dirs : list of str or Path
        ``galbayes fit`` output folders (``results.fits`` + ``run.json``), one per recipe.
    out : str or Path, optional
        Write the table there (``.fits``, or ``.csv``/``.ecsv`` by suffix), atomically.
    loo : bool
        Compute PSIS-LOO where posteriors with pointwise log-likelihoods exist.

    Returns
    -------
    astropy.table.Table
        One row per galaxy (the first run's order): ``id``, ``n_pix``; per run label ``L``
        (the recipe's file stem, or the folder name when two runs share a recipe):
        ``chi2_L``, ``k_L``, ``bic_L``, ``aic_L``, ``elpd_loo_L``, ``elpd_loo_se_L``;
        then ``preferred`` (lowest BIC), ``delta_bic``, ``preferred_aic``, ``preferred_loo``
        (empty unless every compared run has LOO), ``n_models`` (runs compared) and
        ``note``. ``table.meta["RUNS"]`` maps labels to folders.

    Raises
    ------
    InputError
        Fewer than two runs, a folder that is no finished fit, or runs over different
        catalogs (ids differ).
    """
    from astropy.table import Table

    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) < 2:
        raise InputError(f"give at least two run folders to compare, got {len(run_dirs)}", what="RUN_DIR")
    runs = [read_run(d) for d in run_dirs]
    labels = [_label(r["dir"], r["recipe"]) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [_label(r["dir"], None) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}_{i}" for i, lab in enumerate(labels)]

    ids0 = [_text(v) for v in runs[0]["table"]["id"]]
    for r in runs[1:]:
        ids = [_text(v) for v in r["table"]["id"]]
        if set(ids) != set(ids0) or len(ids) != len(ids0):
            only_a = sorted(set(ids0) - set(ids))[:3]
            only_b = sorted(set(ids) - set(ids0))[:3]
            raise InputError(
                f"runs over different catalogs: {runs[0]['dir']} ({len(ids0)} galaxies) and {r['dir']} "
                f"({len(ids)} galaxies) do not have the same ids (only in the first: {only_a}, only in the "
                f"second: {only_b}); compare runs of one catalog", what="RUN_DIR")

    cols: dict = {"id": ids0, "n_pix": []}
    per = {lab: {c: [] for c in ("chi2", "k", "bic", "aic", "elpd_loo", "elpd_loo_se")} for lab in labels}
    preferred, delta, pref_aic, pref_loo, n_models, notes = [], [], [], [], [], []
    rows = [{_text(v): i for i, v in enumerate(r["table"]["id"])} for r in runs]
    for gid in ids0:
        note, npix_seen = [], {}
        vals = {}
        for lab, r, where in zip(labels, runs, rows):
            t = r["table"][where[gid]]
            status = _text(t["status"]).strip()
            chi2, chi2_red, k = _num(t["chi2"]), _num(t["chi2_red"]), r["k"]
            v = {"chi2": math.nan, "k": k, "bic": math.nan, "aic": math.nan,
                 "elpd_loo": math.nan, "elpd_loo_se": math.nan}
            if not is_usable(status):
                note.append(f"{lab} excluded (status: {status})")
            elif not (np.isfinite(chi2) and np.isfinite(chi2_red) and chi2_red > 0):
                note.append(f"{lab} excluded (chi2 {chi2:g}, chi2_red {chi2_red:g}: no pixel count)")
            else:
                n = int(round(chi2 / chi2_red + k))
                npix_seen[lab] = n
                v.update(chi2=chi2, bic=chi2 + k * math.log(n), aic=chi2 + 2.0 * k)
                if loo:
                    from .results import safe_name

                    nc = r["dir"] / "posteriors" / f"{safe_name(gid)}.nc"
                    if nc.is_file():
                        v["elpd_loo"], v["elpd_loo_se"], problem = _loo(nc)
                        if problem:
                            note.append(f"{lab} LOO: {problem}")
                vals[lab] = v
            for c in per[lab]:
                per[lab][c].append(v[c])
        if len(set(npix_seen.values())) > 1:
            note.append("pixel counts differ between runs (" +
                        ", ".join(f"{lab} {n}" for lab, n in npix_seen.items()) + "): not compared")
            vals = {}
        cols["n_pix"].append(next(iter(npix_seen.values())) if npix_seen else -1)
        n_models.append(len(vals))
        if not vals:
            preferred.append("")
            delta.append(math.nan)
            pref_aic.append("")
            pref_loo.append("")
            if not note or not note[-1].startswith("pixel"):
                note.append("no run to compare")
        else:
            order = sorted(vals, key=lambda lab: vals[lab]["bic"])
            preferred.append(order[0])
            delta.append(vals[order[1]]["bic"] - vals[order[0]]["bic"] if len(order) > 1 else math.nan)
            pref_aic.append(min(vals, key=lambda lab: vals[lab]["aic"]))
            have_loo = [lab for lab in vals if np.isfinite(vals[lab]["elpd_loo"])]
            pref_loo.append(max(have_loo, key=lambda lab: vals[lab]["elpd_loo"])
                            if len(have_loo) == len(vals) and len(vals) > 1 else "")
            if len(vals) == 1 and len(labels) > 1:
                note.append(f"only {order[0]} left")
        notes.append("; ".join(note))

    data = {"id": np.array(ids0), "n_pix": np.array(cols["n_pix"], np.int64)}
    for lab in labels:
        for c, a in per[lab].items():
            data[f"{c}_{lab}"] = np.array(a, np.int64 if c == "k" else np.float64)
    data.update(preferred=np.array(preferred, dtype=str), delta_bic=np.array(delta, np.float64),
                preferred_aic=np.array(pref_aic, dtype=str), preferred_loo=np.array(pref_loo, dtype=str),
                n_models=np.array(n_models, np.int64), note=np.array(notes, dtype=str))
    table = Table(data)
    table.meta["RUNS"] = json.dumps({lab: str(r["dir"]) for lab, r in zip(labels, runs)})
    table.meta["CRITERIA"] = "BIC = chi2 + k ln n_pix, AIC = chi2 + 2k at the MAP (Gaussian -2lnL up to a constant)"
    if out is not None:
        write_comparison(table, out)
    return table


def write_comparison(table, out) -> Path:
    """Write the comparison table to ``out`` (FITS unless the suffix is .csv/.ecsv), atomically."""
    from .results import atomic_write, fits_text

    out = Path(out)
    if out.suffix.lower() in (".csv", ".ecsv"):
        fmt = "ascii.ecsv" if out.suffix.lower() == ".ecsv" else "ascii.csv"
        atomic_write(out, lambda p: table.write(p, format=fmt, overwrite=True))
        return out
    safe = table.copy(copy_data=True)
    for name in safe.colnames:
        if safe[name].dtype.kind == "U":
            safe[name] = np.array([fits_text(str(v)) for v in safe[name]])
    safe.meta = {k: fits_text(str(v)).decode() for k, v in table.meta.items()}
    atomic_write(out, lambda p: safe.write(p, format="fits", overwrite=True))
    return out

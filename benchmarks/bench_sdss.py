"""The bundled SDSS galaxies fitted with each PSF kind: how the fits move with the default.

The three bundled galaxies (``galbayes.datasets``; SDSS g, 128², 41² PSFs reconstructed from
psField, i.e. *effective* PSFs that contain the pixel response) are fitted with the recipe and
starting values of ``galbayes demo``, once with ``psf_type="effective"`` (the default) and once
with ``"optical"`` (the PSF sampled at pixel centres: the treatment every fit had before the
default changed), with Laplace errors. Single-Sérsic galaxies are also fitted with Imfit
(pyimfit LM, its default sub-sampling, the same PSF image, mask and σ, from the same start):
Imfit pixel-integrates the profile and convolves with the PSF image as given, so it applies
the pixel response a second time, as ``optical`` does.

Printed per galaxy and parameter: the effective fit ± its Laplace error, the optical fit and
the shift (optical − effective) in units of that error, Imfit's value; and each fit's χ² (in
galbayes' model of that kind). ``--json`` writes it all.

    python benchmarks/bench_sdss.py [--json /tmp/sdss.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KINDS = ("effective", "optical")


def run():
    from galbayes.datasets import EXAMPLES, load_example
    from galbayes.pipeline import fit
    from galbayes.recipe import load_recipe

    out = {}
    for name, (recipe, _, init) in EXAMPLES.items():
        obs = load_example(name)
        model = load_recipe(recipe)
        row = {"recipe": recipe, "keys": list(model.free_keys)}
        for kind in KINDS:
            res = fit(model, obs, init=[init or None], errors="laplace", psf_type=kind)
            r = res.row(obs.id)
            row[kind] = {k: float(r[k]) for k in model.free_keys}
            row[kind + "_err"] = {k: float(r[k + "_err"]) for k in model.free_keys}
            row[kind + "_chi2"] = float(r["chi2"])
            row[kind + "_chi2_red"] = float(r["chi2_red"])
            row[kind + "_status"] = str(r["status"])
        if recipe == "sersic":
            try:
                from galbayes.reference import imfit_fit
            except ImportError as exc:          # pyimfit is a test-only dependency
                row["imfit"] = {"skipped": str(exc)}
            else:
                # galbayes' start (the given values, image moments for the rest)
                start = dict(zip(model.keys, model.initial_values(obs, init or None)[0]))
                im = imfit_fit(obs, {k: float(start[k]) for k in model.free_keys})
                row["imfit"] = {k: float(im[k]) for k in model.free_keys}
                row["imfit_chi2_in_optical"] = _chi2(model, obs, row["imfit"], "optical")
                row["imfit_chi2_in_effective"] = _chi2(model, obs, row["imfit"], "effective")
        out[name] = row
        _print(name, row)
    return out


def _chi2(model, obs, values, kind):
    """χ² of given values in galbayes' model with PSF kind ``kind``."""
    import copy

    import jax
    import jax.numpy as jnp
    import numpy as np

    m = copy.copy(model)
    m.psf_type = kind
    gal = jax.tree_util.tree_map(jnp.asarray, m.pack(obs, values, guess=False))
    r = np.asarray(jax.jit(m.residuals)(gal.values0, gal), np.float64)
    return float(r @ r)


def _print(name, row):
    print(f"\n== {name} ({row['recipe']})")
    print(f"{'parameter':<12} {'effective':>20} {'optical':>11} {'shift/err':>9} {'Imfit':>11}")
    for k in row["keys"]:
        e, err, o = row["effective"][k], row["effective_err"][k], row["optical"][k]
        im = row.get("imfit", {}).get(k, float("nan"))
        shift = (o - e) / err if err > 0 else float("nan")
        print(f"{k:<12} {e:>11.4f} ± {err:<7.4f} {o:>11.4f} {shift:>9.1f} {im:>11.4f}")
    for kind in KINDS:
        print(f"χ² {kind}: {row[kind + '_chi2']:.1f} (χ²_red {row[kind + '_chi2_red']:.4f}; {row[kind + '_status']})")
    if "imfit_chi2_in_optical" in row:
        print(f"Imfit's solution: χ² {row['imfit_chi2_in_optical']:.1f} in the optical model, "
              f"{row['imfit_chi2_in_effective']:.1f} in the effective one")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    from common import machine

    result = {"machine": machine(), "galaxies": run()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Automatic masks and starts on a population of crowded GalSim scenes (issue 14's checks).

Each scene is a 128² cutout: a target Sérsic near the centre (n 0.5-6, re 2.5-15 px
log-uniform, q 0.25-1, mag 16-18.5, centre within ±1.5 px of the middle), one or two
neighbouring Sérsic galaxies 24-45 px away (mag 17.5-19.5, re 2-6 px) and, in 70 % of the
scenes, a star (mag 17.5-19.5) 30-50 px away; everything is drawn by GalSim with its default
method through a Moffat (FWHM 3 px, β 3.5), the PSF image drawn the same way (effective), and
realistic σ (sky 0.01 + source Poisson, gain 500). The scene generator is this script's own
(not the tests'), with wider ranges than ``tests/test_prepare.py``.

For each scene :func:`galbayes.prepare.analyse_cutout` (photutils detection and deblending,
dilated segments, moment and curve-of-growth estimates) gives a mask and starting values.
Measured:

* mask: the fraction of the target's flux left unmasked (criterion ≥ 0.95) and, for every
  neighbour and star, the fraction of its flux masked (criterion ≥ 0.90);
* estimates against the truth: centre offset, |Δre/re|, |Δmag|, |Δq|;
* fits: the single-Sérsic recipe with every default, on the automatic mask, started once from
  the automatic estimates and once from the truth; criterion χ²(automatic) ≤ χ²(truth) + 1
  for ≥ 95 % of the scenes; and the automatic-start fit's errors against the truth;
* a ceiling for the two mask criteria: an oracle mask that knows every source's noiseless
  image and masks a pixel where any other source is brighter than ``c`` × the target there
  (c = 0.3, 1, 2), scored the same way. Where the oracle cannot meet both criteria, no mask of
  pixels can (close neighbours on the wings of an extended high-n target).

    python benchmarks/bench_prepare.py [--count 64] [--seed 0] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KEYS = ("xc", "yc", "pa", "q", "re", "mag", "n")
ORACLE_C = (0.3, 1.0, 2.0)
SKY, GAIN, SIZE = 0.01, 500.0, 128


def _star(galsim, x, y, mag, shape, zp=22.5):
    ny, nx = shape
    obj = galsim.Moffat(beta=3.5, fwhm=3.0, flux=10 ** (-0.4 * (mag - zp)))
    return obj.drawImage(nx=nx, ny=ny, scale=1.0, offset=(x - (nx - 1) / 2, y - (ny - 1) / 2)).array.astype(float)


def scene(seed: int):
    """(data, sigma, target image, [other sources' images], truth) of one crowded cutout."""
    import galsim
    from galbayes.mocks import render_sersic

    rng = np.random.default_rng(seed)
    c = (SIZE - 1) / 2
    shape = (SIZE, SIZE)
    t = dict(xc=c + rng.uniform(-1.5, 1.5), yc=c + rng.uniform(-1.5, 1.5), pa=rng.uniform(-90, 90),
             q=rng.uniform(0.25, 1.0), re=float(np.exp(rng.uniform(np.log(2.5), np.log(15)))),
             n=rng.uniform(0.5, 6.0), mag=rng.uniform(16.0, 18.5))
    target = render_sersic(shape=shape, **t)
    others = []
    a0 = rng.uniform(0, 2 * np.pi)
    for k in range(int(rng.integers(1, 3))):
        a, d = a0 + 2.3 * k, rng.uniform(24, 45)
        others.append(render_sersic(shape=shape, xc=c + d * np.cos(a), yc=c + d * np.sin(a), pa=rng.uniform(-90, 90),
                                    q=rng.uniform(0.4, 1.0), re=rng.uniform(2.0, 6.0), n=rng.uniform(0.8, 3.0),
                                    mag=rng.uniform(17.5, 19.5)))
    if rng.uniform() < 0.7:
        a, d = a0 + np.pi + rng.uniform(-0.5, 0.5), rng.uniform(30, 50)
        others.append(_star(galsim, c + d * np.cos(a), c + d * np.sin(a), rng.uniform(17.5, 19.5), shape))
    model = target + sum(others)
    sigma = np.sqrt(SKY**2 + model / GAIN)
    data = model + rng.normal(size=shape) * sigma
    return data, sigma, target, others, t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from common import machine
    from galbayes.data import Observation
    from galbayes.errors import InputError
    from galbayes.mocks import moffat_psf
    from galbayes.pipeline import fit
    from galbayes.prepare import analyse_cutout
    from galbayes.recipe import load_recipe

    psf = moffat_psf(41)
    t0 = time.perf_counter()
    rows, obs, inits = [], [], []
    for i in range(args.count):
        data, sigma, target, others, truth = scene(args.seed * 100_000 + i)
        row = {"scene": i, "truth": truth, "n_others": len(others)}
        row["oracle"] = {}
        for c in ORACLE_C:
            m = np.zeros(target.shape, bool)
            for o in others:
                m |= o > c * target
            row["oracle"][c] = bool((target * ~m).sum() / target.sum() >= 0.95
                                    and min((o * m).sum() / o.sum() for o in others) >= 0.90)
        try:
            an = analyse_cutout(data, sigma=sigma, psf=psf, galaxy=f"scene{i}")
        except InputError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        m = an.mask > 0
        row["kept"] = float((target * ~m).sum() / target.sum())
        row["covered"] = [float((o * m).sum() / o.sum()) for o in others]
        e = an.estimates
        row["est"] = {k: float(e[k]) for k in KEYS}
        for kind, v in (("auto", e), ("truth", truth)):
            obs.append(Observation(image=data, sigma=sigma, psf=psf, mask=an.mask, id=f"s{i}_{kind}"))
            inits.append({f"sersic_{p}": float(v[p]) for p in KEYS})
        rows.append(row)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = fit(load_recipe("sersic"), obs, init=inits).table
    t_fit = time.perf_counter() - t0
    by_id = {str(r["id"]): r for r in table}
    for row in rows:
        if "error" in row:
            continue
        a, t = by_id[f"s{row['scene']}_auto"], by_id[f"s{row['scene']}_truth"]
        row["chi2_auto"], row["chi2_truth"] = float(a["chi2"]), float(t["chi2"])
        row["status"] = (str(a["status"]), str(t["status"]))
        row["fit_auto"] = {k: float(a[f"sersic_{k}"]) for k in KEYS}

    ok = [r for r in rows if "error" not in r]
    tr = [r["truth"] for r in ok]
    est = [r["est"] for r in ok]
    fa = [r["fit_auto"] for r in ok]
    dchi2 = np.array([r["chi2_auto"] - r["chi2_truth"] for r in ok])
    covered = np.concatenate([r["covered"] for r in ok]) if ok else np.zeros(0)
    kept = np.array([r["kept"] for r in ok])

    def med_rel(a, key):
        return float(np.median([abs(x[key] / t[key] - 1) for x, t in zip(a, tr)]))

    def med_abs(a, key):
        return float(np.median([abs(x[key] - t[key]) for x, t in zip(a, tr)]))

    summary = {
        "scenes": args.count, "analysed": len(ok), "refused": [r["error"] for r in rows if "error" in r],
        "mask_target_kept_ge_0.95": f"{int((kept >= 0.95).sum())}/{len(kept)}",
        "mask_target_kept_min": float(kept.min()) if len(kept) else None,
        "mask_others_covered_ge_0.90": f"{int((covered >= 0.90).sum())}/{len(covered)}",
        "mask_others_covered_min": float(covered.min()) if len(covered) else None,
        "mask_both_criteria": f"{sum(r['kept'] >= 0.95 and min(r['covered']) >= 0.90 for r in ok)}/{len(ok)}",
        "oracle_mask_both_criteria": {str(c): f"{sum(r['oracle'][c] for r in rows)}/{len(rows)}" for c in ORACLE_C},
        "chi2_auto_le_truth_plus_1": f"{int((dchi2 <= 1.0).sum())}/{len(dchi2)}",
        "chi2_auto_minus_truth_median": float(np.median(dchi2)) if len(dchi2) else None,
        "chi2_auto_minus_truth_max": float(dchi2.max()) if len(dchi2) else None,
        "fits_not_ok": [(r["scene"], r["status"]) for r in ok if r["status"] != ("ok", "ok")],
        "estimates": {"median_centre_offset_px": float(np.median([np.hypot(x["xc"] - t["xc"], x["yc"] - t["yc"])
                                                                  for x, t in zip(est, tr)])),
                      "median_abs_dre": med_rel(est, "re"), "median_abs_dmag": med_abs(est, "mag"),
                      "median_abs_dq": med_abs(est, "q")},
        "fit_from_auto": {"median_abs_dre": med_rel(fa, "re"), "median_abs_dn": med_rel(fa, "n"),
                          "median_abs_dmag": med_abs(fa, "mag")},
        "seconds": {"render_and_prepare": round(t_prep, 1), "fit": round(t_fit, 1)},
        "machine": machine(),
    }
    worst = sorted(ok, key=lambda r: r["chi2_auto"] - r["chi2_truth"])[-3:]
    summary["worst_dchi2"] = [{"scene": r["scene"], "dchi2": round(r["chi2_auto"] - r["chi2_truth"], 2),
                               "truth": {k: round(v, 3) for k, v in r["truth"].items()},
                               "est": {k: round(v, 3) for k, v in r["est"].items()}} for r in worst]
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=float))


if __name__ == "__main__":
    main()

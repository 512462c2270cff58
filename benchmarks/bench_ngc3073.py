"""NGC 3073 (SDSS r, 150×200): galbayes' bulge + disk beside Imfit's published fit.

Imfit's own test image (``tests/n3073rss_small.fits`` with ``_mask`` and
``psf_moffat_35_n4699z.fits`` from github.com/perwin/imfit; not shipped here: pass the folder
holding them with ``--data``) and its config ``imfit_config_n3073.dat`` (Sérsic + exponential
sharing one centre; gain 4.725, read noise 4.3 e⁻, original sky 154.33 ADU), whose published
fit (Imfit's ``tests/imfit_reference/imfit_textout4``) has χ² = 36,828.58 on 28,754 pixels.

σ is Imfit's data-based noise: σ² = (image + sky) / gain + (read noise / gain)², in ADU. The
PSF is an analytic Moffat sampled at pixel centres, i.e. *optical* in galbayes' terms; it is
fitted both ways (``--psf-type`` both by default), from Imfit's config starting values, with
the ``bulge_disk`` recipe and its own bounds (Imfit's solution lies inside them). Imfit itself (pyimfit, LM, the config file's bounds) is fitted in the same run when
pyimfit is installed, and its solution is also evaluated in galbayes' model.

    python benchmarks/bench_ngc3073.py --data DIR [--json F]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GAIN, READ_NOISE, SKY = 4.725, 4.3, 154.33
ZP = 30.0                      # any zero point: magnitudes here are relative
PUBLISHED_CHI2 = 36828.577653
FILES = ("n3073rss_small.fits", "n3073rss_small_mask.fits", "psf_moffat_35_n4699z.fits")


def _exp_flux(i0, h, q):
    return 2.0 * math.pi * i0 * h * h * q


def imfit_to_galbayes(p: dict) -> dict:
    """Imfit's Sérsic + exponential (1-based centre, ell, I_e, I_0) in galbayes' bulge_disk keys."""
    from galbayes.params import wrap_angle
    from galbayes.reference import sersic_flux_norm

    qb, qd = 1.0 - p["ell_b"], 1.0 - p["ell_d"]
    return {"bulge_xc": p["x0"] - 1.0, "bulge_yc": p["y0"] - 1.0, "bulge_pa": wrap_angle(p["pa_b"]),
            "bulge_q": qb, "bulge_n": p["n"], "bulge_re": p["re"],
            "bulge_mag": ZP - 2.5 * math.log10(p["ie"] * sersic_flux_norm(p["n"], p["re"], qb)),
            "disk_pa": wrap_angle(p["pa_d"]), "disk_q": qd, "disk_rs": p["h"],
            "disk_mag": ZP - 2.5 * math.log10(_exp_flux(p["i0"], p["h"], qd))}


CONFIG_START = dict(x0=101.0, y0=97.0, pa_b=110.0, ell_b=0.2, n=1.5, ie=150.0, re=15.0,
                    pa_d=55.0, ell_d=0.2, i0=70.0, h=45.0)
PUBLISHED = dict(x0=100.7073, y0=97.0877, pa_b=111.919, ell_b=0.184262, n=3.2805, ie=78.2972, re=26.7976,
                 pa_d=51.724, ell_d=0.35226, i0=39.7753, h=53.6058)


def load(data_dir: Path):
    from astropy.io import fits

    missing = [f for f in FILES if not (data_dir / f).is_file()]
    if missing:
        raise SystemExit(f"{data_dir}: missing {missing} (Imfit's tests/ folder has them)")
    image = fits.getdata(data_dir / FILES[0]).astype(np.float64)
    mask = fits.getdata(data_dir / FILES[1]).astype(np.float64)
    psf = fits.getdata(data_dir / FILES[2]).astype(np.float64)
    sigma = np.sqrt(np.clip(image + SKY, 0.0, None) / GAIN + (READ_NOISE / GAIN) ** 2)
    return image, mask, psf, sigma


def run_imfit(image, mask, psf):
    import pyimfit

    s = CONFIG_START
    md = pyimfit.SimpleModelDescription()
    md.x0.setValue(s["x0"], [90, 110])
    md.y0.setValue(s["y0"], [90, 110])
    b = pyimfit.make_imfit_function("Sersic", label="bulge")
    b.PA.setValue(s["pa_b"], [0, 180])
    b.ell.setValue(s["ell_b"], [0, 1])
    b.n.setValue(s["n"], [0, 5])
    b.I_e.setValue(s["ie"], [0, 500])
    b.r_e.setValue(s["re"], [0, 100])
    d = pyimfit.make_imfit_function("Exponential", label="disk")
    d.PA.setValue(s["pa_d"], [0, 90])
    d.ell.setValue(s["ell_d"], [0, 1])
    d.I_0.setValue(s["i0"], [0, 600])
    d.h.setValue(s["h"], [0, 1000])
    md.addFunction(b)
    md.addFunction(d)
    fitter = pyimfit.Imfit(md, psf=psf)
    fitter.fit(image, mask=mask, gain=GAIN, read_noise=READ_NOISE, original_sky=SKY, solver="LM")
    x0, y0, pa_b, ell_b, n, ie, re, pa_d, ell_d, i0, h = fitter.getRawParameters()
    return float(fitter.fitStatistic), dict(x0=x0, y0=y0, pa_b=pa_b, ell_b=ell_b, n=n, ie=ie, re=re,
                                            pa_d=pa_d, ell_d=ell_d, i0=i0, h=h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="folder with Imfit's NGC 3073 test files")
    ap.add_argument("--psf-type", choices=("both", "optical", "effective"), default="both")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from common import machine
    from galbayes.data import Observation
    from galbayes.pipeline import fit
    from galbayes.recipe import load_recipe
    from galbayes.reference import Chi2Reference

    image, mask, psf, sigma = load(args.data)
    model = load_recipe("bulge_disk")
    kinds = ("optical", "effective") if args.psf_type == "both" else (args.psf_type,)
    obs = {k: Observation(image=image, sigma=sigma, psf=psf, mask=mask, id=f"ngc3073_{k}", zp=ZP, psf_type=k)
           for k in kinds}
    report = {"machine": machine(), "pixels": int((mask == 0).sum()), "published_chi2": PUBLISHED_CHI2}
    start = imfit_to_galbayes(CONFIG_START)
    published = imfit_to_galbayes(PUBLISHED)
    solutions = {"published Imfit": published}
    try:
        c2, p = run_imfit(image, mask, psf)
        solutions["Imfit (this run)"] = imfit_to_galbayes(p)
        report["imfit_chi2_this_run"] = c2
    except ImportError:
        report["imfit_chi2_this_run"] = None
    out = fit(model, list(obs.values()), init=[{k: start[k] for k in model.free_keys}] * len(kinds),
              errors="jacobian")
    rows = {str(r["id"]): r for r in out.table}
    for k in kinds:
        r = rows[f"ngc3073_{k}"]
        solutions[f"galbayes {k}"] = {key: float(r[key]) for key in model.free_keys}
        report[f"galbayes_{k}_status"] = str(r["status"])
        report[f"galbayes_{k}_errors"] = {key: float(r[key + "_err"]) for key in model.free_keys}
    ref = Chi2Reference(model)
    table = {}
    for name, vals in solutions.items():
        table[name] = {"values": vals, "chi2": {k: ref.chi2(obs[k], vals) for k in kinds}}
    report["solutions"] = table

    keys = model.free_keys
    print(f"NGC 3073, {report['pixels']} unmasked pixels; Imfit's published χ² {PUBLISHED_CHI2:.1f}"
          + (f", this run's {report['imfit_chi2_this_run']:.1f}" if report["imfit_chi2_this_run"] else ""))
    print(f"{'parameter':<11}" + "".join(f"{n:>20}" for n in table))
    for key in keys:
        print(f"{key:<11}" + "".join(f"{t['values'][key]:>20.4f}" for t in table.values()))
    for k in kinds:
        print(f"{'χ² ' + k:<11}" + "".join(f"{t['chi2'][k]:>20.1f}" for t in table.values()))
    for k in kinds:
        e = report[f"galbayes_{k}_errors"]
        g, p = table[f"galbayes {k}"]["values"], published
        shift = {key: round((g[key] - p[key]) / e[key], 1) for key in keys if e[key] > 0}
        print(f"galbayes {k} − published Imfit, in galbayes' errors: {shift}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()

"""Model fidelity: model error at the TRUE parameters against GalSim, and MAP fits beside Imfit.

Usage::

    python benchmarks/bench_fidelity.py                      # E on 64 mocks + MAP fits of 128
    python benchmarks/bench_fidelity.py --count 64 --fit-count 0 --json /tmp/fid.json

Mocks as real data come: GalSim Sérsic ⊛ Moffat (FWHM 3 px, β 3.5, untruncated) drawn with
GalSim's default method on 128² stamps; the 41² PSF image drawn the same way (``effective``,
it contains the pixel response) and, for the ``optical`` rows, with ``no_pixel``. σ = sky
(0.01) + source Poisson-like variance (gain 500), as galbayes.mocks.

Part 1, per galaxy E = Σ((truth − model)/σ)² at the true parameters (n 0.5–6.2, re 2.5–18 px,
q 0.25–1, centre within ±1 px of the stamp centre): galbayes with the effective PSF
(default), with the optical PSF, galbayes' old treatment (effective PSF used as if optical,
no band-limited core: the behaviour before psf_type), and Imfit (pyimfit: profile
pixel-integrated with its default sub-sampling, then convolved with the same effective PSF).
AstroPhot (its defaults: profile sampled and integrated
over pixels, then convolved with the same effective PSF) is run by
``benchmarks/astrophot_render.py`` under ``--astrophot-python`` (AstroPhot needs torch: e.g.
``python3 -m venv venv-ap && venv-ap/bin/pip install torch astrophot scipy astropy``), or in
this interpreter if astrophot imports here; else its row says skipped.

Part 2, MAP fits of ``--fit-count`` mocks (galbayes.mocks defaults, effective PSF,
SExtractor-like perturbed starts, n0 = 2) by galbayes and Imfit LM from the same starts:
median |Δre/re|, |Δn/n|, |Δmag| against the truth, the median signed Δn/n for n > 4, and the
fraction of galaxies where galbayes' χ² minimum ≤ Imfit's + 0.1 (both solutions' χ² in
galbayes' model, so that renderer differences drop out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KEYS = ("sersic_xc", "sersic_yc", "sersic_pa", "sersic_q", "sersic_re", "sersic_n", "sersic_mag")


def imfit_model_image(t, psf, shape, zp):
    """Imfit's model image at the galbayes-convention parameters ``t`` (no fit)."""
    import pyimfit

    from galbayes.reference import sersic_flux_norm

    ie = 10 ** (-0.4 * (t["sersic_mag"] - zp)) / sersic_flux_norm(t["sersic_n"], t["sersic_re"], t["sersic_q"])
    md = pyimfit.SimpleModelDescription()
    md.x0.setValue(t["sersic_xc"] + 1.0)
    md.y0.setValue(t["sersic_yc"] + 1.0)
    f = pyimfit.make_imfit_function("Sersic", label="sersic")
    f.PA.setValue(t["sersic_pa"])
    f.ell.setValue(1.0 - t["sersic_q"])
    f.n.setValue(t["sersic_n"])
    f.I_e.setValue(ie)
    f.r_e.setValue(t["sersic_re"])
    md.addFunction(f)
    fitter = pyimfit.Imfit(md, psf=psf)
    return fitter.getModelImage(shape=shape)


def astrophot_model_images(truths, psf, shape, zp, python):
    """AstroPhot's model images at the parameters ``truths`` (no fit), rendered by
    benchmarks/astrophot_render.py under the interpreter ``python`` (AstroPhot needs torch,
    usually in a virtualenv of its own). Returns (images, version, settings)."""
    import subprocess
    import tempfile

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, truth=np.array([[t[k] for k in KEYS] for t in truths], float), psf=np.asarray(psf, float),
                 shape=np.asarray(shape), zp=float(zp))
        subprocess.run([python, str(HERE / "astrophot_render.py"), str(src), str(dst)], check=True)
        got = np.load(dst)
        return got["model"], str(got["version"]), str(got["settings"])


def astrophot_python(given):
    """The interpreter that has AstroPhot: ``given``, else this one if it imports astrophot."""
    if given:
        return given
    try:
        import astrophot  # noqa: F401
    except Exception:
        return None
    return sys.executable


def summarise(E, n):
    E, n = map(lambda a: __import__("numpy").asarray(a, float), (E, n))
    import numpy as np

    return {"median": float(np.median(E)), "p95": float(np.percentile(E, 95)), "max": float(E.max()),
            "median_n_gt_4": float(np.median(E[n > 4])) if np.any(n > 4) else None,
            "max_n_gt_4": float(E[n > 4].max()) if np.any(n > 4) else None}


def part1(count, seed, ap_python=None):
    import galsim
    import jax
    import jax.numpy as jnp
    import numpy as np

    import galbayes as gb
    from galbayes.mocks import moffat_psf, render_sersic
    from galbayes.recipe import load_recipe

    rng = np.random.default_rng(seed)
    gsp = galsim.GSParams(maximum_fft_size=32768, folding_threshold=3e-4, maxk_threshold=3e-4)
    truths, images = [], []
    t0 = time.perf_counter()
    for _ in range(count):
        t = dict(sersic_xc=63.5 + rng.uniform(-1, 1), sersic_yc=63.5 + rng.uniform(-1, 1),
                 sersic_pa=rng.uniform(-90, 90), sersic_q=rng.uniform(0.25, 1),
                 sersic_re=float(np.exp(rng.uniform(np.log(2.5), np.log(18)))), sersic_n=rng.uniform(0.5, 6.2),
                 sersic_mag=rng.uniform(16, 18.5))
        truths.append(t)
        images.append(render_sersic(n=t["sersic_n"], re=t["sersic_re"], q=t["sersic_q"], pa=t["sersic_pa"],
                                    mag=t["sersic_mag"], xc=t["sersic_xc"], yc=t["sersic_yc"], shape=(128, 128),
                                    gsparams=gsp))
    print(f"GalSim: {count} mocks in {time.perf_counter() - t0:.1f} s", flush=True)
    sig = [np.sqrt(0.01**2 + np.clip(im, 0, None) / 500.0) for im in images]
    psf = {k: moffat_psf(41, psf_type=k) for k in ("effective", "optical")}
    n = [t["sersic_n"] for t in truths]

    def E_galbayes(kind, psf_img, core=True):
        model = load_recipe("sersic")
        model.core = core
        gals = [model.pack(gb.Observation(image=im, sigma=s, psf=psf_img, psf_type=kind), t, guess=False)
                for im, s, t in zip(images, sig, truths)]
        batch = jax.tree_util.tree_map(jnp.asarray, gb.Model.stack(gals))
        m = np.asarray(jax.jit(jax.vmap(lambda g: model.render(g.values0, g)))(batch), np.float64)
        E = [float((((im - mm) / s) ** 2).sum()) for im, mm, s in zip(images, m, sig)]
        flux = [float(mm.sum() / im.sum() - 1) for im, mm in zip(images, m)]
        return E, flux

    rows = {}
    for name, kind, p, core in (("galbayes effective", "effective", psf["effective"], True),
                                ("galbayes optical", "optical", psf["optical"], True),
                                ("galbayes before (pixel twice, no core)", "optical", psf["effective"], False)):
        E, flux = E_galbayes(kind, p, core)
        rows[name] = summarise(E, n) | {"max_abs_dflux": float(np.max(np.abs(flux)))}
    try:
        E = []
        for im, s, t in zip(images, sig, truths):
            m = imfit_model_image(t, psf["effective"], im.shape, 22.5)
            E.append(float((((im - m) / s) ** 2).sum()))
        rows["Imfit (effective PSF)"] = summarise(E, n)
    except ImportError as exc:
        rows["Imfit (effective PSF)"] = {"skipped": str(exc)}
    python = astrophot_python(ap_python)
    if python is None:
        rows["AstroPhot (effective PSF)"] = {"skipped": "astrophot does not import here; give --astrophot-python"}
    else:
        models, version, settings = astrophot_model_images(truths, psf["effective"], (128, 128), 22.5, python)
        E = [float((((im - m) / s) ** 2).sum()) for im, m, s in zip(images, models, sig)]
        flux = [float(m.sum() / im.sum() - 1) for im, m in zip(images, models)]
        rows["AstroPhot (effective PSF)"] = summarise(E, n) | {"max_abs_dflux": float(np.max(np.abs(flux))),
                                                               "version": version, "settings": settings}
    return rows


def part2(count, seed, batch_size):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from common import accuracy

    from galbayes.mocks import sersic_mocks
    from galbayes.pipeline import fit
    from galbayes.recipe import load_recipe
    from galbayes.reference import imfit_fit

    mocks = sersic_mocks(count, seed=seed)          # effective PSF, perturbed starts
    model = load_recipe("sersic")
    obs = [m.obs for m in mocks]
    inits = [m.init for m in mocks]
    truths = [m.truth for m in mocks]
    t0 = time.perf_counter()
    out = fit(model, obs, init=inits, batch_size=batch_size)
    gb_s = time.perf_counter() - t0
    gb_rows = [{k: float(r[k]) for k in model.keys} | {"chi2": float(r["chi2"])} for r in out.table]
    print(f"galbayes: {count} fits in {gb_s:.1f} s (incl. compile)", flush=True)
    im_rows = []
    t0 = time.perf_counter()
    for o, i in zip(obs, inits):
        try:
            im_rows.append(imfit_fit(o, i))
        except Exception as exc:
            im_rows.append({k: float("nan") for k in KEYS} | {"error": str(exc)})
    im_s = time.perf_counter() - t0
    print(f"Imfit: {count} fits in {im_s:.1f} s", flush=True)
    res_fn = jax.jit(model.residuals)

    def chi2_gb(o, values):
        gal = jax.tree_util.tree_map(jnp.asarray, model.pack(o, {k: values[k] for k in model.free_keys}))
        r = np.asarray(res_fn(gal.values0, gal), np.float64)
        return float(r @ r)

    c_gb = np.array([chi2_gb(o, r) for o, r in zip(obs, gb_rows)])
    c_im = np.array([chi2_gb(o, r) if np.isfinite(r["sersic_n"]) else np.inf for o, r in zip(obs, im_rows)])
    n_true = np.array([t["sersic_n"] for t in truths])

    def bias_high_n(rows):
        d = np.array([r["sersic_n"] / t["sersic_n"] - 1 for r, t in zip(rows, truths)])
        return float(np.median(d[n_true > 4]))

    ok = [np.isfinite(r["sersic_n"]) for r in im_rows]
    return {"count": count, "galbayes_s": gb_s, "imfit_s": im_s,
            "galbayes": accuracy(gb_rows, truths) | {"median_dn_over_n_for_n_gt_4": bias_high_n(gb_rows)},
            "imfit": accuracy([r for r, k in zip(im_rows, ok) if k], [t for t, k in zip(truths, ok) if k])
            | {"median_dn_over_n_for_n_gt_4": bias_high_n([r if k else {"sersic_n": np.nan} for r, k in zip(im_rows, ok)])},
            "imfit_failed": int(len(ok) - sum(ok)),
            "frac_galbayes_chi2_le_imfit_plus_0.1": float(np.mean(c_gb <= c_im + 0.1)),
            "worst_chi2_excess_over_imfit": float(np.max(c_gb - c_im))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=64, help="mocks for E at the truth (0: skip)")
    ap.add_argument("--fit-count", type=int, default=128, help="mocks for MAP fits beside Imfit (0: skip)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--astrophot-python", help="a Python interpreter with AstroPhot (and torch) installed, "
                    "e.g. /path/venv-ap/bin/python; default: this one, if astrophot imports")
    args = ap.parse_args(argv)
    from common import machine

    result = {"machine": machine()}
    if args.count:
        result["E_at_truth"] = part1(args.count, args.seed, args.astrophot_python)
        for name, r in result["E_at_truth"].items():
            print(f"{name:<40} " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r.items()), flush=True)
    if args.fit_count:
        result["map_vs_imfit"] = part2(args.fit_count, args.seed + 1, args.batch_size)
        print(json.dumps(result["map_vs_imfit"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

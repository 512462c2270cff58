"""Benchmark of galbayes' error estimates (issue "Error bars and posteriors").

Sections (``--section``, default all):

* ``laplace``  — 256 GalSim Sérsic mocks, 128×128 pixels, 41×41 PSF, shipped ``sersic``
  recipe: MAP fit time (SVI + LM, batches of 64) vs Laplace (b) numpyro Hessian — from the
  fit (``laplace_errors(model, batch, fit)``, reusing the LM's last JᵀJ, as the pipeline
  does) and from the values alone — and (a) the paper's (JᵀWJ)⁻¹ on the same batches, and the bootstrap per galaxy (a few galaxies ×
  100 replicas); compile times reported separately.
* ``nuts``     — NUTS effective samples per second per galaxy, all galaxies' chains
  vectorised in one program vs one galaxy at a time (48×48 mocks, 15×15 PSF, the shipped
  recipe).
* ``coverage`` — 68% coverage per parameter on many noise realisations of one GalSim truth
  (the tests' set-up, more realisations): Laplace (a) and (b), bootstrap, NUTS.

Run: ``python benchmarks/bench_errors.py [--section laplace|nuts|coverage] [--json out.json]``.
Timings exclude compilation (reported separately) and are wall-clock on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

import galbayes as gb
from galbayes.inference import bootstrap_errors, fit_map, laplace_errors, run_nuts
from galbayes.mocks import moffat_psf, sersic_mocks
from galbayes.recipe import load_recipe


def _stack(model, mocks):
    return gb.Model.stack([model.pack(m.obs, m.init) for m in mocks])


def _sub(batch, idx):
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], batch)


def _timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- Laplace cost
def bench_laplace(n_gal=256, size=128, psf_size=41, batch=64, n_boot_gal=4, n_boot=100):
    print(f"== Laplace vs MAP: {n_gal} mocks {size}x{size}, PSF {psf_size}x{psf_size}, batches of {batch}")
    model = load_recipe("sersic")
    mocks, t_mock = _timed(sersic_mocks, n_gal, size=size, psf_size=psf_size, seed=0)
    print(f"   GalSim mocks: {t_mock:.1f} s")
    full = _stack(model, mocks)
    chunks = [np.arange(s, min(s + batch, n_gal)) for s in range(0, n_gal, batch)]
    out = {"n_gal": n_gal, "size": size, "psf": psf_size, "batch": batch}
    # MAP (compile on the first batch, then time all batches)
    _, c_map = _timed(fit_map, model, _sub(full, chunks[0]))
    values, fits, t_map = [], [], 0.0
    for idx in chunks:
        res, t = _timed(fit_map, model, _sub(full, idx))
        values.append(res.values)
        fits.append(res)
        t_map += t
    values = np.concatenate(values)
    out.update(map_s=t_map, map_compile_s=c_map)
    print(f"   MAP (SVI+LM): {t_map:.2f} s for {n_gal} ({1e3 * t_map / n_gal:.1f} ms/galaxy); compile {c_map:.1f} s")
    # (b) from the fit (reusing its last Gauss-Newton matrix: what the pipeline does), (b)
    # from the values alone (a fresh Jacobian), (a) the paper's covariance
    variants = (("hessian_fit", "hessian", lambda j, idx: fits[j]),
                ("hessian", "hessian", lambda j, idx: values[idx]),
                ("jacobian", "jacobian", lambda j, idx: values[idx]))
    for name, method, arg in variants:
        _, c = _timed(laplace_errors, model, _sub(full, chunks[0]), arg(0, chunks[0]), method=method)
        t, flags = 0.0, []
        for j, idx in enumerate(chunks):
            r, dt = _timed(laplace_errors, model, _sub(full, idx), arg(j, idx), method=method)
            t += dt
            flags += r.flags
        n_ok = sum(f == "ok" for f in flags)
        out[f"laplace_{name}_s"] = t
        out[f"laplace_{name}_compile_s"] = c
        out[f"laplace_{name}_ok"] = n_ok
        print(f"   Laplace {name:<11}: {t:.2f} s ({1e3 * t / n_gal:.1f} ms/galaxy) = {100 * t / t_map:.1f}% "
              f"of the MAP time; compile {c:.1f} s; {n_ok}/{n_gal} flags ok")
        for flag in sorted(set(flags) - {"ok"}):
            print(f"      {flags.count(flag)} x {flag}")
    if n_boot_gal:
        idx = np.arange(n_boot_gal)
        sub = _sub(full, idx)
        size_b = n_boot_gal * n_boot // 2
        _, c = _timed(bootstrap_errors, model, sub, values[idx], n_boot=n_boot, batch_size=size_b)
        r, t = _timed(bootstrap_errors, model, sub, values[idx], n_boot=n_boot, batch_size=size_b, seed=1)
        per = t / n_boot_gal
        out.update(bootstrap_s_per_galaxy=per, bootstrap_compile_s=c - t)
        print(f"   bootstrap ({n_boot} replicas, LM from the MAP): {per:.2f} s/galaxy = "
              f"{per / (t_map / n_gal):.0f}x the MAP time; flags {r.flags}")
    return out


# ----------------------------------------------------------------------------- NUTS speed
def bench_nuts(n_gal=8, size=48, psf_size=15, chains=4, warmup=200, draws=400):
    print(f"== NUTS: {n_gal} mocks {size}x{size}, PSF {psf_size}, {chains} chains x ({warmup} warmup + {draws} draws)")
    model = load_recipe("sersic", likelihood="gaussian")
    mocks = sersic_mocks(n_gal, size=size, psf_size=psf_size, seed=5, re_range=(2.5, 8.0),
                         q_range=(0.35, 0.9), n_range=(0.8, 4.0), mag_range=(17.0, 18.5))
    full = _stack(model, mocks)
    values = fit_map(model, full).values
    kw = dict(chains=chains, warmup=warmup, draws=draws, seed=3)
    res_b = run_nuts(model, full, values, **kw)
    ess_b = np.nanmin(res_b.ess_bulk, axis=1)
    t_b = res_b.wall_time
    ess_1, t_1, c_1 = [], [], 0.0
    for j in range(n_gal):
        r = run_nuts(model, _sub(full, [j]), values[[j]], **kw)
        ess_1.append(np.nanmin(r.ess_bulk[0]))
        t_1.append(r.wall_time)
        c_1 += r.compile_time
    ess_1, t_1 = np.array(ess_1), np.array(t_1)
    out = {
        "n_gal": n_gal, "chains": chains, "warmup": warmup, "draws": draws,
        "batched_wall_s": t_b, "batched_compile_s": res_b.compile_time,
        "batched_ess_min_median": float(np.median(ess_b)),
        "batched_gal_ess_per_s": float(ess_b.sum() / t_b),
        "batched_per_galaxy_ess_per_s_median": float(np.median(ess_b / t_b)),
        "single_wall_s_total": float(t_1.sum()), "single_compile_s": c_1,
        "single_ess_min_median": float(np.median(ess_1)),
        "single_gal_ess_per_s": float(ess_1.sum() / t_1.sum()),
        "single_per_galaxy_ess_per_s_median": float(np.median(ess_1 / t_1)),
        "batched_max_rhat": float(np.nanmax(res_b.r_hat)), "batched_divergences": int(res_b.divergences.sum()),
        "batched_mean_steps": res_b.mean_tree_steps.round(1).tolist(),
    }
    out["speedup"] = out["batched_gal_ess_per_s"] / out["single_gal_ess_per_s"]
    print(f"   batched : {t_b:.1f} s for all {n_gal} (compile {res_b.compile_time:.1f} s); min-ESS/galaxy "
          f"median {out['batched_ess_min_median']:.0f}; {out['batched_gal_ess_per_s']:.1f} galaxy-ESS/s in total, "
          f"{out['batched_per_galaxy_ess_per_s_median']:.2f} ESS/s per galaxy")
    print(f"   one by one: {t_1.sum():.1f} s in total; min-ESS/galaxy median {out['single_ess_min_median']:.0f}; "
          f"{out['single_gal_ess_per_s']:.1f} galaxy-ESS/s in total, "
          f"{out['single_per_galaxy_ess_per_s_median']:.2f} ESS/s per galaxy")
    print(f"   throughput gain of batching: {out['speedup']:.2f}x; max R-hat {out['batched_max_rhat']:.4f}, "
          f"divergences {out['batched_divergences']}, mean leapfrog steps {out['batched_mean_steps']}")
    return out


# ----------------------------------------------------------------------------- coverage
TRUTH = {"sersic_xc": 19.3, "sersic_yc": 20.2, "sersic_pa": 30.0, "sersic_q": 0.6,
         "sersic_re": 4.0, "sersic_n": 2.5, "sersic_mag": 19.0}


def _calibration_mock(size=40, psf_size=11):
    import galsim
    from scipy.signal import fftconvolve

    t = TRUTH
    psf = moffat_psf(psf_size, fwhm=2.5)
    g = galsim.Sersic(n=t["sersic_n"], half_light_radius=t["sersic_re"] * np.sqrt(t["sersic_q"]),
                      flux=10 ** (-0.4 * (t["sersic_mag"] - 22.5)))
    g = g.shear(q=t["sersic_q"], beta=(t["sersic_pa"] + 90.0) * galsim.degrees)
    offset = (t["sersic_xc"] - (size - 1) / 2.0, t["sersic_yc"] - (size - 1) / 2.0)
    img = g.drawImage(nx=size, ny=size, scale=1.0, offset=offset).array.astype(np.float64)
    noiseless = fftconvolve(img, psf, mode="same")
    sigma = np.sqrt(0.02**2 + np.clip(noiseless, 0, None) / 500.0)
    return noiseless, sigma, psf


def _coverage(model, values, err, truth, use):
    d = values - truth
    for i, e in enumerate(model.entries):
        if e.spec.angle:
            d[:, i] = (d[:, i] + 90.0) % 180.0 - 90.0
    inside = np.abs(d) <= err
    return {k.replace("sersic_", ""): float(inside[use, model.keys.index(k)].mean()) for k in TRUTH}


def bench_coverage(n_real=1000, n_boot_real=100, n_boot=100, n_nuts=400, nuts_batch=None,
                   oversample=((11, 5),)):
    print(f"== coverage: {n_real} realisations (Laplace), {n_boot_real} x {n_boot} replicas (bootstrap), "
          f"{n_nuts} (NUTS, 4 chains x (200 + 400))")
    model = gb.Model([gb.Component("sersic", "sersic", {"re": {"bounds": [0.3, 40.0]},
                                                       "n": {"bounds": [0.3, 8.0]}})],
                     likelihood="gaussian", oversample=oversample)
    noiseless, sigma, psf = _calibration_mock()
    rng = np.random.default_rng(7)
    data = noiseless[None] + rng.normal(size=(n_real,) + noiseless.shape) * sigma[None]
    batch = gb.Model.stack([model.pack(gb.Observation(image=d, sigma=sigma, psf=psf, zp=22.5), TRUTH)
                            for d in data])
    res = fit_map(model, batch, max_iter=0)
    truth = np.array([TRUTH.get(k, 0.0) for k in model.keys])
    rows, n_used = {}, {}
    lap = {m: laplace_errors(model, batch, res.values, method=m, batch_size=500) for m in ("hessian", "jacobian")}
    ok = np.array([a == b == "ok" for a, b in zip(lap["hessian"].flags, lap["jacobian"].flags)])
    for m, name in (("hessian", "Laplace (b) Hessian"), ("jacobian", "Laplace (a) (J^T W J)^-1")):
        rows[name] = _coverage(model, res.values, lap[m].errors, truth, ok)
        n_used[name] = int(ok.sum())
    free = np.asarray(model.free)
    rel = np.abs(lap["jacobian"].errors[ok][:, free] / lap["hessian"].errors[ok][:, free] - 1)
    agree = {"median": float(np.median(rel)), "p90": float(np.percentile(rel, 90)), "max": float(rel.max())}
    ratio, t_boot = np.full(len(free), np.nan), 0.0
    if n_boot_real:
        t0 = time.perf_counter()
        idx = np.arange(n_boot_real)
        boot = bootstrap_errors(model, _sub(batch, idx), res.values[idx], n_boot=n_boot, batch_size=500)
        t_boot = time.perf_counter() - t0
        okb = ok[idx] & np.array([f == "ok" for f in boot.flags])
        rows["bootstrap"] = _coverage(model, res.values[idx], boot.errors, truth, okb)
        n_used["bootstrap"] = int(okb.sum())
        ratio = np.median(boot.errors[okb][:, free] / lap["hessian"].errors[idx][okb][:, free], axis=0)
    nuts = None
    if n_nuts:
        idx = np.arange(n_nuts)
        nuts = run_nuts(model, _sub(batch, idx), res.values[idx], chains=4, warmup=200, draws=400, seed=2,
                        batch_size=nuts_batch)
        lo, hi = np.percentile(nuts.samples, [15.87, 84.13], axis=(1, 2))
        okn = ok[idx]
        rows["NUTS (central 68%)"] = _coverage(model, (lo + hi) / 2, (hi - lo) / 2, truth, okn)
        n_used["NUTS (central 68%)"] = int(okn.sum())
        # the same realisations with Laplace (b): a paired control for the sampling noise
        rows["Laplace (b), NUTS subset"] = _coverage(model, res.values[idx], lap["hessian"].errors[idx], truth, okn)
        n_used["Laplace (b), NUTS subset"] = int(okn.sum())
        sd = nuts.samples.std(axis=(1, 2))
        width = np.median(sd[okn][:, free] / lap["hessian"].errors[idx][okn][:, free], axis=0)
        shift = np.median(np.abs(nuts.samples.mean(axis=(1, 2)) - res.values[idx])[okn][:, free]
                          / lap["hessian"].errors[idx][okn][:, free], axis=0)
    keys = [k.replace("sersic_", "") for k in TRUTH]
    print("| method | N | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, cov in rows.items():
        print(f"| {name} | {n_used[name]} | " + " | ".join(f"{100 * cov[k]:.1f}%" for k in keys) + " |")
    print(f"   (a) vs (b) relative error difference: median {agree['median']:.4f}, 90th pct {agree['p90']:.4f}, "
          f"max {agree['max']:.3f}; flagged realisations {int((~ok).sum())}/{n_real}")
    print(f"   bootstrap/Laplace median error ratio {np.round(ratio, 3).tolist()}; bootstrap {t_boot:.0f} s")
    out = {"coverage": rows, "n": n_used, "agreement_a_vs_b": agree, "bootstrap_over_laplace": ratio.tolist()}
    if nuts is not None:
        se = 100 * np.sqrt(0.68 * 0.32 / max(int(okn.sum()), 1))
        print(f"   NUTS: binomial standard error of a 68% coverage on {int(okn.sum())} realisations {se:.1f}%; "
              f"max R-hat {np.nanmax(nuts.r_hat):.4f}, divergences {int(nuts.divergences.sum())}, "
              f"{nuts.wall_time:.0f} s sampling; median NUTS sd / Laplace sigma {np.round(width, 3).tolist()}; "
              f"median |NUTS mean - MAP| / sigma {np.round(shift, 3).tolist()} ({model.free_keys})")
        out.update({"nuts_max_rhat": float(np.nanmax(nuts.r_hat)), "nuts_divergences": int(nuts.divergences.sum()),
                    "nuts_sd_over_laplace": width.tolist(), "nuts_mean_minus_map_over_sigma": shift.tolist(),
                    "nuts_wall_s": nuts.wall_time})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=["laplace", "nuts", "coverage", "all"], default="all")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    ap.add_argument("--n-real", type=int, default=1000, help="coverage: Laplace realisations")
    ap.add_argument("--n-boot-real", type=int, default=100, help="coverage: bootstrap realisations")
    ap.add_argument("--n-nuts", type=int, default=400, help="coverage: NUTS realisations (<= --n-real)")
    ap.add_argument("--nuts-batch", type=int, default=None, help="coverage: galaxies per NUTS program")
    ap.add_argument("--laplace-batch", type=int, default=64, help="laplace: galaxies per MAP/Laplace batch")
    ap.add_argument("--n-boot-gal", type=int, default=4, help="laplace: galaxies for the bootstrap timing (0: skip)")
    args = ap.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    out = {}
    if args.section in ("laplace", "all"):
        out["laplace"] = bench_laplace(**({"n_gal": 16, "batch": 8, "n_boot_gal": 1} if args.quick else
                                          {"batch": args.laplace_batch, "n_boot_gal": args.n_boot_gal}))
    if args.section in ("nuts", "all"):
        out["nuts"] = bench_nuts(**({"n_gal": 2, "warmup": 100, "draws": 100} if args.quick else {}))
    if args.section in ("coverage", "all"):
        out["coverage"] = bench_coverage(**({"n_real": 64, "n_boot_real": 4, "n_boot": 20, "n_nuts": 2}
                                            if args.quick else
                                            {"n_real": args.n_real, "n_boot_real": args.n_boot_real,
                                             "n_nuts": args.n_nuts, "nuts_batch": args.nuts_batch}))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())

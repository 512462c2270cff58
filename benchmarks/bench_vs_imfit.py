"""galbayes (batched MAP) against Imfit (pyimfit, Levenberg-Marquardt, one galaxy after the
other) on the same GalSim mocks, side by side in one process.

Usage::

    python benchmarks/bench_vs_imfit.py                  # 64 mocks, one batch of 64
    python benchmarks/bench_vs_imfit.py --count 32 --batch-size 32 --json /tmp/vs_imfit.json

Both start from the same perturbed starting values (galbayes.mocks: centre ±0.5 px,
re ×e^N(0,0.25), q ±0.05, pa ±10°, mag ±0.2, n = 2) with the same bounds. Reported:
speed (galaxies per second; galbayes excluding and including its one-off compile), the
median fractional errors in re and n and |Δmag| against the truth, and χ² — each code's
own χ² at its own solution, and galbayes' χ² of Imfit's solution (same model, so that
renderer differences drop out). GALMOSS (PyTorch) is run only if ``torch`` and ``galmoss``
import.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def galmoss_status() -> str:
    try:
        import torch  # noqa: F401
        import galmoss  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"skipped: {type(exc).__name__}: {exc}"
    return "available (not wired into this benchmark yet)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--also-batch", type=int, default=1,
                    help="also time galbayes at this batch size (0: don't); batch 1 is fastest on a CPU")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from common import accuracy, machine

    from galbayes.reference import imfit_fit
    from galbayes.devices import place_batch
    from galbayes.inference.map import MapOptions, precompile
    from galbayes.mocks import sersic_mocks
    from galbayes.model import Model
    from galbayes.pipeline import fit
    from galbayes.recipe import load_recipe

    info = machine()
    print(f"machine: {info}")
    t0 = time.perf_counter()
    mocks = sersic_mocks(args.count, seed=args.seed)
    print(f"{args.count} GalSim mocks (128x128, 41x41 Moffat PSF) in {time.perf_counter() - t0:.1f} s")
    obs = [m.obs for m in mocks]
    inits = [m.init for m in mocks]
    truths = [m.truth for m in mocks]
    model = load_recipe("sersic")
    opts = MapOptions()

    # ---- galbayes: compile the batch program once (timed apart), then the public fit()
    def compile_for(batch_size):
        size = 1
        while size < min(batch_size, args.count):
            size *= 2
        first = Model.stack([model.pack(obs[j % args.count], inits[j % args.count]) for j in range(size)])
        keys = jax.random.split(jax.random.PRNGKey(opts.seed), size)
        b, k, _ = place_batch(first, keys)
        t0 = time.perf_counter()
        precompile(model, first, options=opts)
        return time.perf_counter() - t0

    def timed_fit(batch_size):
        t0 = time.perf_counter()
        out = fit(model, obs, init=inits, options=opts, batch_size=batch_size)
        return out, time.perf_counter() - t0

    B = min(args.batch_size, args.count)
    if args.count % B:
        print(f"note: {args.count} is not a multiple of the batch size; the last batch's shape is compiled "
              "inside the timed fit")
    compile_s = compile_for(B)
    out, gb_s = timed_fit(B)
    gb_rows = [{k: float(r[k]) for k in model.keys} | {"chi2": float(r["chi2"]), "n_iter": int(r["n_iter"]),
                                                      "converged": bool(r["converged"])} for r in out.table]
    floor = fit(model, obs, init=truths, options=opts, batch_size=B)
    floor_rows = [{k: float(r[k]) for k in model.keys} for r in floor.table]
    print(f"galbayes: compile {compile_s:.1f} s, fit {gb_s:.1f} s ({args.count / gb_s:.2f} gal/s)", flush=True)
    extra = None
    if args.also_batch and args.also_batch != B:
        c_s = compile_for(args.also_batch)
        out_b, s_b = timed_fit(args.also_batch)
        rel = {k: np.array([abs(float(x[k]) / float(y[k]) - 1.0) for x, y in zip(out_b.table, out.table)])
               for k in ("sersic_re", "sersic_n")}
        dmag = np.array([abs(float(x["sersic_mag"]) - float(y["sersic_mag"])) for x, y in zip(out_b.table, out.table)])
        extra = {"batch": args.also_batch, "compile_s": c_s, "gal_per_s": args.count / s_b,
                 "max_rel_diff_re": float(rel["sersic_re"].max()), "max_rel_diff_n": float(rel["sersic_n"].max()),
                 "max_abs_diff_mag": float(dmag.max()),
                 "n_gal_re_or_n_diff_above_1e-4": int(np.sum((rel["sersic_re"] > 1e-4) | (rel["sersic_n"] > 1e-4)))}
        print(f"galbayes batch {args.also_batch}: compile {c_s:.1f} s, fit {s_b:.1f} s ({extra['gal_per_s']:.2f} gal/s); "
              f"vs batch {B}: max |d re/re| {extra['max_rel_diff_re']:.1e}, max |d n/n| {extra['max_rel_diff_n']:.1e}, "
              f"max |d mag| {extra['max_abs_diff_mag']:.1e}; {extra['n_gal_re_or_n_diff_above_1e-4']} galaxies "
              "differ by > 1e-4 in re or n", flush=True)

    # ---- Imfit, serial
    im_rows, im_times = [], []
    for o, i in zip(obs, inits):
        t0 = time.perf_counter()
        try:
            r = imfit_fit(o, i)
        except Exception as exc:  # a failed fit counts, with NaNs
            r = {k: float("nan") for k in model.keys} | {"chi2": float("nan"), "error": str(exc)}
        im_times.append(time.perf_counter() - t0)
        im_rows.append(r)
    im_s = float(sum(im_times))
    print(f"Imfit: {im_s:.1f} s ({args.count / im_s:.2f} gal/s); per galaxy median {np.median(im_times):.2f} s, "
          f"max {max(im_times):.1f} s", flush=True)

    # ---- χ² of both solutions in galbayes' model (float32 residuals summed in float64)
    res_fn = jax.jit(model.residuals)

    def chi2_gb(o, values):
        gal = jax.tree_util.tree_map(jnp.asarray, model.pack(o, {k: values[k] for k in model.free_keys}))
        r = np.asarray(res_fn(gal.values0, gal), np.float64)
        return float(r @ r)

    cross, own = [], []
    for o, g, im in zip(obs, gb_rows, im_rows):
        own.append(g["chi2"] - im["chi2"])
        try:
            cross.append(chi2_gb(o, im) - chi2_gb(o, g))
        except Exception:  # Imfit's values outside galbayes' bounds
            cross.append(float("nan"))
    own, cross = np.asarray(own), np.asarray(cross)
    worse = [(o.id, round(float(c), 2), i["sersic_q"]) for o, c, i in zip(obs, cross, inits) if c < -0.1]

    acc = {"galbayes": accuracy(gb_rows, truths), "imfit": accuracy(im_rows, truths),
           "galbayes_from_truth": accuracy(floor_rows, truths)}
    speed = {"galbayes_gal_per_s": args.count / gb_s, "galbayes_compile_s": compile_s,
             "galbayes_gal_per_s_with_compile": args.count / (gb_s + compile_s),
             "imfit_gal_per_s": args.count / im_s, "imfit_median_s": float(np.median(im_times)),
             "imfit_max_s": float(max(im_times))}
    speed["ratio"] = speed["galbayes_gal_per_s"] / speed["imfit_gal_per_s"]
    speed["ratio_with_compile"] = speed["galbayes_gal_per_s_with_compile"] / speed["imfit_gal_per_s"]
    chi2 = {"median_own_gb_minus_imfit": float(np.nanmedian(own)),
            "range_own": [float(np.nanmin(own)), float(np.nanmax(own))],
            "median_cross": float(np.nanmedian(cross)), "min_cross": float(np.nanmin(cross)),
            "frac_cross_below_minus_0.1": float(np.nanmean(cross < -0.1)),
            "frac_cross_above_1": float(np.nanmean(cross > 1.0))}

    print(f"\n{args.count} mocks, batch {B}")
    print(f"{'':<22}{'med|dre/re|':>12}{'med|dn/n|':>11}{'med|dmag|':>11}{'med dn/n':>10}{'re&n<10%':>10}")
    for name, a in acc.items():
        print(f"{name:<22}{a['med_abs_dre']:>12.4f}{a['med_abs_dn']:>11.4f}{a['med_abs_dmag']:>11.4f}"
              f"{a['med_dn']:>+10.4f}{a['within10']:>10.3f}")
    print(f"\nspeed: galbayes {speed['galbayes_gal_per_s']:.2f} gal/s (compile {compile_s:.0f} s apart; "
          f"{speed['galbayes_gal_per_s_with_compile']:.2f} gal/s with it), Imfit {speed['imfit_gal_per_s']:.2f} gal/s")
    print(f"ratio galbayes/Imfit: {speed['ratio']:.2f}x ({speed['ratio_with_compile']:.2f}x including compile)")
    if extra:
        speed["ratio_batch_%d" % extra["batch"]] = extra["gal_per_s"] / speed["imfit_gal_per_s"]
        print(f"ratio galbayes batch {extra['batch']}/Imfit: {speed['ratio_batch_%d' % extra['batch']]:.2f}x")
    print(f"chi2 at own solution, galbayes - Imfit: median {chi2['median_own_gb_minus_imfit']:+.2f}, "
          f"range [{chi2['range_own'][0]:+.1f}, {chi2['range_own'][1]:+.1f}] (different renderers)")
    print(f"galbayes chi2 of Imfit's solution - of galbayes' MAP: median {chi2['median_cross']:+.3f}, "
          f"min {chi2['min_cross']:+.3f}; Imfit better by > 0.1: {chi2['frac_cross_below_minus_0.1']:.3f}, "
          f"worse by > 1: {chi2['frac_cross_above_1']:.3f}")
    print("galaxies where Imfit's solution is better by > 0.1 (id, chi2 difference, starting q):", worse)
    n_gb_conv = sum(r["converged"] for r in gb_rows)
    n_im_conv = sum(bool(r.get("converged", False)) for r in im_rows)
    print(f"converged: galbayes {n_gb_conv}/{args.count}, Imfit {n_im_conv}/{args.count}")
    gm = galmoss_status()
    print(f"GALMOSS: {gm}")
    info["loadavg_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    print(f"load average at the end: {info['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "count": args.count, "batch": B, "speed": speed,
                                               "accuracy": acc, "chi2": chi2, "galmoss": gm, "also": extra,
                                               "imfit_better": worse,
                                               "imfit_times": im_times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MAP throughput and peak memory against batch size; default vs LM-only vs SVI-only.

Usage::

    python benchmarks/bench_map.py                       # sweep 1,4,16,64,256,1024 + options
    python benchmarks/bench_map.py --sizes 1,16,64 --budget 300 --no-options
    python benchmarks/bench_map.py --json /tmp/bench_map.json

Every measurement runs in a fresh subprocess, so its peak resident memory (``ru_maxrss``)
belongs to that batch size alone (XLA allocates outside Python: tracemalloc cannot see it).
Galaxies: a pool of 64 GalSim single-Sérsic mocks (128×128, 41×41 Moffat PSF, perturbed
starts with n = 2), repeated to fill large batches. Compile time (trace + XLA) is measured
separately by compiling the batch's program ahead of time; the timed runs then call the
public :func:`galbayes.inference.map.fit_map` (which finds the compiled program) on packed
batches. Packing (``Model.pack``: σ-map checks, moments, PSF FFT, on the host) is timed
separately per galaxy.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OPTIONS = {
    "default": {},
    "lm_only": {"max_iter": 0},
    "svi_only": {"polish": "none", "max_iter": 1000},
}


# --------------------------------------------------------------------------- child
def child(args) -> dict:
    import jax
    import numpy as np

    from common import load_mocks, peak_rss_mb
    from galbayes.devices import place_batch
    from galbayes.inference.map import MapOptions, fit_map, precompile
    from galbayes.model import Model
    from galbayes.recipe import load_recipe

    B = args.child
    opts = MapOptions(**OPTIONS[args.options])
    obs, truths, inits = load_mocks(args.mocks)
    model = load_recipe("sersic")
    t0 = time.perf_counter()
    pool = [model.pack(o, i) for o, i in zip(obs, inits)]
    pack_s = (time.perf_counter() - t0) / len(pool)
    n_batches = max(1, math.ceil(args.min_galaxies / B))
    batches = [Model.stack([pool[(b * B + j) % len(pool)] for j in range(B)]) for b in range(n_batches)]
    rss_data = peak_rss_mb()

    keys = jax.random.split(jax.random.PRNGKey(opts.seed), B)
    placed, placed_keys, _ = place_batch(batches[0], keys)
    t0 = time.perf_counter()
    precompile(model, batches[0], options=opts)
    compile_s = time.perf_counter() - t0
    rss_compile = peak_rss_mb()

    run_s, chi2, n_iter, conv = 0.0, [], [], []
    used = {"svi": 0, "lm": 0}     # per-galaxy steps actually needed
    paid = {"svi": 0, "lm": 0}     # steps the batch ran (all lanes iterate until the slowest stops)
    for batch in batches:
        t0 = time.perf_counter()
        res = fit_map(model, batch, options=opts)
        run_s += time.perf_counter() - t0
        chi2 += list(res.chi2)
        n_iter += list(res.n_iter)
        conv += list(res.converged)
        for stage, steps in (("svi", res.n_svi), ("lm", res.n_lm)):
            used[stage] += int(np.sum(steps))
            paid[stage] += int(B * np.max(steps))
    n_gal = n_batches * B
    npool = min(len(pool), n_gal)
    return {"batch": B, "options": args.options, "galaxies": n_gal, "batches": n_batches,
            "run_s": run_s, "gal_per_s": n_gal / run_s, "compile_s": compile_s, "pack_s_per_gal": pack_s,
            "rss_data_mb": rss_data, "rss_after_compile_mb": rss_compile, "rss_peak_mb": peak_rss_mb(),
            "median_n_iter": float(np.median(n_iter)), "converged": float(np.mean(conv)),
            "lane_efficiency": {k: used[k] / paid[k] if paid[k] else 1.0 for k in used},
            "chi2_pool": [float(c) for c in chi2[:npool]]}


# --------------------------------------------------------------------------- parent
def run_child(mocks, batch, options, min_galaxies, timeout):
    cmd = [sys.executable, __file__, "--child", str(batch), "--mocks", str(mocks), "--options", options,
           "--min-galaxies", str(min_galaxies)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"batch": batch, "options": options, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"batch": batch, "options": options, "error": p.stderr.strip().splitlines()[-1:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16,64,256,1024")
    ap.add_argument("--min-galaxies", type=int, default=64, help="galaxies timed per batch size (>= one batch)")
    ap.add_argument("--budget", type=float, default=600.0, help="wall-clock cap of the batch-size sweep (s)")
    ap.add_argument("--options-batch", type=int, default=32, help="batch size of the options comparison")
    ap.add_argument("--no-options", action="store_true", help="skip default vs LM-only vs SVI-only")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mocks", help=argparse.SUPPRESS)
    ap.add_argument("--options", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from common import machine, mock_pool

    info = machine()
    print(f"machine: {info}")
    tmp = Path(tempfile.mkdtemp(prefix="galbayes-bench-"))
    mocks = mock_pool(64, 0, tmp / "mocks.npz")
    sizes = [int(s) for s in args.sizes.split(",")]
    sweep, t_start = [], time.perf_counter()
    print(f"\n{'batch':>6} {'galaxies':>8} {'gal/s':>8} {'run s':>8} {'compile s':>9} {'peak RSS MB':>11} "
          f"{'after compile':>13} {'data':>6} {'n_iter':>6} {'conv':>5} {'lanes SVI/LM':>12}")
    for B in sizes:
        left = args.budget - (time.perf_counter() - t_start)
        if sweep and "gal_per_s" in sweep[-1]:
            last = sweep[-1]
            est = last["compile_s"] * 1.2 + max(B, args.min_galaxies) / last["gal_per_s"] + 20
            if est > left:
                sweep.append({"batch": B, "error": f"skipped: estimated {est:.0f} s > {left:.0f} s left of the budget"})
                print(f"{B:>6} {sweep[-1]['error']}")
                continue
        r = run_child(mocks, B, "default", args.min_galaxies, timeout=max(left, 60.0))
        sweep.append(r)
        if "error" in r:
            print(f"{B:>6} {r['error']}")
            continue
        print(f"{B:>6} {r['galaxies']:>8} {r['gal_per_s']:>8.2f} {r['run_s']:>8.1f} {r['compile_s']:>9.1f} "
              f"{r['rss_peak_mb']:>11.0f} {r['rss_after_compile_mb']:>13.0f} {r['rss_data_mb']:>6.0f} "
              f"{r['median_n_iter']:>6.0f} {r['converged']:>5.2f} "
              f"{r['lane_efficiency']['svi']:>6.2f}/{r['lane_efficiency']['lm']:.2f}", flush=True)
    ok = [r for r in sweep if "gal_per_s" in r]
    if ok:
        ref = next((r for r in ok if r["batch"] == 1), ok[0])
        print(f"\nthroughput relative to batch {ref['batch']}: "
              + ", ".join(f"{r['batch']}: {r['gal_per_s'] / ref['gal_per_s']:.2f}x" for r in ok))
        print(f"host packing: {1e3 * ok[0]['pack_s_per_gal']:.1f} ms per galaxy (not in gal/s)")
        print("lanes: steps the galaxies needed / steps their batches ran (a vmapped while loop "
              "iterates every galaxy until the batch's slowest one stops), SVI and LM stages")

    opt_rows = []
    if not args.no_options:
        import numpy as np

        B = args.options_batch
        print(f"\noptions, batch {B}, {max(B, args.min_galaxies)} galaxies (64 distinct):")
        for name in OPTIONS:
            opt_rows.append(run_child(mocks, B, name, args.min_galaxies, timeout=1800))
        good = [r for r in opt_rows if "chi2_pool" in r]
        if good:
            best = np.min([r["chi2_pool"] for r in good], axis=0)
            ref = next((r for r in good if r["options"] == "default"), good[0])
            print(f"{'options':<10} {'gal/s':>8} {'x default':>9} {'compile s':>9} {'n_iter':>6} {'conv':>5} "
                  f"{'med dchi2':>9} {'max dchi2':>10} {'dchi2<0.5':>9}")
            for r in opt_rows:
                if "error" in r:
                    print(f"{r['options']:<10} {r['error']}")
                    continue
                d = np.asarray(r["chi2_pool"]) - best
                r["dchi2_vs_best"] = {"median": float(np.median(d)), "max": float(d.max()),
                                      "frac_below_0.5": float(np.mean(d < 0.5))}
                print(f"{r['options']:<10} {r['gal_per_s']:>8.2f} {r['gal_per_s'] / ref['gal_per_s']:>9.2f} "
                      f"{r['compile_s']:>9.1f} {r['median_n_iter']:>6.0f} {r['converged']:>5.2f} "
                      f"{np.median(d):>9.3f} {d.max():>10.2f} {np.mean(d < 0.5):>9.2f}")
            print("dchi2: a galaxy's chi2 (float32, as reported) minus the lowest of the three runs")
    info["loadavg_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    print(f"\nload average at the end: {info['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "sweep": sweep, "options": opt_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

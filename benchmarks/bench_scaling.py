"""Catalog runs at survey scale: peak memory vs catalog length, and shard throughput with and
without prefetch.

Every measurement runs in a fresh Python process (peak RSS = ``ru_maxrss`` of that process).
The catalogs repeat the same few 32×32 stamps (9×9 PSF) under distinct ids, the model is a
single Gaussian without sub-pixel integration, image blocks are off and the iteration budgets
are tiny, so the figures measure the runner (loading, batching, shard files, manifest,
assembly) rather than the optimiser.

    python benchmarks/bench_scaling.py                       # 1k, 10k, 100k rows + prefetch
    python benchmarks/bench_scaling.py --sizes 1000 10000 --prefetch-rows 4096
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/bench_scaling.py ...

Prints a Markdown table (and ``--json FILE`` writes the raw numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_CFG = {"oversample": [], "components": {"g": {"profile": "gaussian"}}}


def write_stamps(folder: Path, count: int = 4, size: int = 32, psf_size: int = 9):
    import numpy as np
    from astropy.io import fits

    def gauss(n, xc, yc, s, flux):
        y, x = np.mgrid[:n, :n].astype(np.float64)
        g = np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2 * s * s))
        return flux * g / g.sum()

    folder.mkdir(parents=True, exist_ok=True)
    c = (psf_size - 1) / 2
    fits.writeto(folder / "psf.fits", gauss(psf_size, c, c, 1.2, 1.0), overwrite=True)
    for i in range(count):
        rng = np.random.default_rng(100 + i)
        img = gauss(size, 15.3 + 0.4 * i, 15.6 - 0.3 * i, 2.0 + 0.4 * i, 150.0) + rng.normal(0, 0.05, (size, size))
        fits.writeto(folder / f"img{i}.fits", img.astype(np.float32), overwrite=True)
        fits.writeto(folder / f"sig{i}.fits", np.full((size, size), 0.05, np.float32), overwrite=True)


def write_catalog(folder: Path, n: int, count: int = 4) -> Path:
    path = folder / f"cat_{n}.csv"
    with open(path, "w") as fh:
        fh.write("id,image,sigma,psf\n")
        for j in range(n):
            i = j % count
            fh.write(f"gal{j:07d},img{i}.fits,sig{i}.fits,psf.fits\n")
    return path


def child(args) -> dict:
    """One run in this (fresh) process; returns its figures."""
    t0 = time.perf_counter()
    import jax

    import galbayes.runner as runner
    from galbayes.recipe import recipe_from_dict

    model = recipe_from_dict(MODEL_CFG)
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stamps = []
    orig = runner._finish_shard

    def timed(*a, **k):
        res = orig(*a, **k)
        stamps.append(time.perf_counter())
        return res

    runner._finish_shard = timed
    t1 = time.perf_counter()
    runner.run_catalog(args.catalog, model, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                       blocks=False, progress=False, prefetch=not args.no_prefetch,
                       options=runner.MapOptions(max_iter=args.max_iter, lm_iter=args.lm_iter),
                       return_table=False)
    t2 = time.perf_counter()
    n_shards = len(stamps)
    steady = (stamps[-1] - stamps[0]) / (n_shards - 1) if n_shards > 1 else float("nan")
    return {"rows": args.rows, "devices": jax.device_count(), "prefetch": not args.no_prefetch,
            "batch_size": args.batch_size, "shard_size": args.shard_size, "shards": n_shards,
            "wall_s": t2 - t0, "run_s": t2 - t1, "first_shard_s": stamps[0] - t1 if stamps else float("nan"),
            "steady_s_per_shard": steady, "assemble_s": t2 - stamps[-1] if stamps else float("nan"),
            "gal_per_s": args.shard_size / steady if n_shards > 1 else float("nan"),
            "rss_after_import_mb": rss_import / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(catalog: Path, out: Path, rows: int, opts, prefetch: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", "--catalog", str(catalog), "--out", str(out), "--rows", str(rows),
           "--batch-size", str(opts.batch_size), "--shard-size", str(opts.shard_size),
           "--max-iter", str(opts.max_iter), "--lm-iter", str(opts.lm_iter)]
    if not prefetch:
        cmd.append("--no-prefetch")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    p.add_argument("--prefetch-rows", type=int, default=8192, help="catalog length of the prefetch comparison (0: skip)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--max-iter", type=int, default=2)
    p.add_argument("--lm-iter", type=int, default=2)
    p.add_argument("--workdir", default=None, help="folder for stamps, catalogs and outputs (default: a temp dir)")
    p.add_argument("--json", default=None)
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="galbayes-bench-")
        work = Path(tmp.name)
    else:
        work = Path(args.workdir)
    write_stamps(work)
    results = {"memory": [], "prefetch": []}
    print(f"# galbayes runner scaling ({os.cpu_count()} CPU cores; batch {args.batch_size}, shard "
          f"{args.shard_size}, max_iter {args.max_iter}, lm_iter {args.lm_iter}, blocks off)\n")
    print("| rows | shards | peak RSS (MB) | RSS after import (MB) | run (s) | first shard incl. compile (s) "
          "| steady galaxies/s | assemble (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        cat = write_catalog(work, n)
        r = run_child(cat, work / f"out_{n}", n, args)
        results["memory"].append(r)
        print(f"| {n} | {r['shards']} | {r['peak_rss_mb']:.0f} | {r['rss_after_import_mb']:.0f} | {r['run_s']:.1f} "
              f"| {r['first_shard_s']:.1f} | {r['gal_per_s']:.0f} | {r['assemble_s']:.2f} |", flush=True)
    if args.prefetch_rows:
        cat = write_catalog(work, args.prefetch_rows)
        print(f"\n{args.prefetch_rows} rows, {args.prefetch_rows // args.shard_size} shards:\n")
        print("| prefetch | steady s/shard | galaxies/s | peak RSS (MB) |")
        print("|---|---:|---:|---:|")
        for prefetch in (True, False):
            r = run_child(cat, work / f"out_prefetch_{prefetch}", args.prefetch_rows, args, prefetch=prefetch)
            results["prefetch"].append(r)
            print(f"| {'on' if prefetch else 'off'} | {r['steady_s_per_shard']:.2f} | {r['gal_per_s']:.0f} "
                  f"| {r['peak_rss_mb']:.0f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory of a catalog run vs catalog length: is it flat?

Each case runs in a fresh Python process and reports its peak RSS (``ru_maxrss``) and the
RSS after imports, so the difference is what the case itself needed:

``catalog``
    :func:`galbayes.catalog.open_catalog` + ``scan(512)`` (validates every row, duplicate
    check, shard index) + parsing every shard's rows into ``CatalogRow`` objects.
``runner``
    :func:`galbayes.runner.run_catalog` end to end — catalog scan, shard rows, input-file
    fingerprints, shard FITS files, journal commits, manifest, streamed assembly of
    ``results.fits``/``results.csv`` (``return_table=False``) — **with the per-galaxy FITS
    loading and the fit replaced by a cheap stand-in** (every row gets the status
    ``"benchmark stand-in: not fitted"``; this stand-in exists only in this script). So the
    figure is the runner's bookkeeping, not images or XLA (see bench_scaling.py for real fits).
``old``
    (``--old``) the catalog reader this replaced: ``read_catalog`` of commit 58e586f (astropy
    ``Table.read`` of the whole file + one ``CatalogRow`` per row), loaded from git.

Every row points at the same four 32×32 stamps (9×9 PSF) under its own id.

    python benchmarks/bench_memory.py                       # 1e4, 1e5, 1e6 rows, CSV
    python benchmarks/bench_memory.py --sizes 10000 100000 --format fits --old
    python benchmarks/bench_memory.py --json out.json

Prints a Markdown table.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import MODEL_CFG, write_stamps  # noqa: E402

OLD_COMMIT = "58e586f"


def write_catalog(folder: Path, n: int, fmt: str, count: int = 4) -> Path:
    path = folder / f"cat_{n}.csv"
    if not path.exists():
        with open(path, "w") as fh:
            fh.write("id,image,sigma,psf,g_fwhm,ra,dec\n")
            for j in range(n):
                i = j % count
                fh.write(f"gal{j:08d},img{i}.fits,sig{i}.fits,psf.fits,{3 + j % 5},{150 + j * 1e-6:.6f},"
                         f"{2 + j * 1e-6:.6f}\n")
    if fmt == "csv":
        return path
    out = folder / f"cat_{n}.fits"
    if not out.exists():
        from astropy.table import Table

        Table.read(path, format="ascii.csv").write(out)
    return out


def rss_mb() -> float:
    """Peak RSS of this process: VmHWM (reset by exec; ``ru_maxrss`` keeps the parent's
    peak across fork + exec), else ``ru_maxrss``."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    import numpy as np  # noqa: F401  (imports before the baseline)
    from astropy.io import fits  # noqa: F401
    from astropy.table import Table  # noqa: F401

    import galbayes.runner as runner
    from galbayes.catalog import open_catalog
    from galbayes.recipe import recipe_from_dict

    model = recipe_from_dict(MODEL_CFG)
    base = rss_mb()
    t0 = time.perf_counter()
    if args.case == "catalog":
        cat = open_catalog(args.catalog, model=model)
        n = cat.scan(512)
        t_scan = time.perf_counter() - t0
        seen = sum(len(cat.shard(k)) for k in range(cat.n_shards()))
        assert seen == n
        extra = {"scan_s": t_scan}
    elif args.case == "runner":
        def stand_in(model, rows):  # BENCHMARK STAND-IN: no FITS reading, no fit
            return [(row, None, None, "benchmark stand-in: not fitted") for row in rows]

        runner._load_rows = stand_in
        runner.run_catalog(args.catalog, model, args.out, batch_size=64, shard_size=512, blocks=False,
                           progress=False, return_table=False)
        from astropy.io import fits as _f

        with _f.open(Path(args.out) / "results.fits", memmap=True) as h:
            n = int(h[1].header["NAXIS2"])
        extra = {"shards": len(list((Path(args.out) / "shards").glob("shard_*.fits")))}
    else:  # the reader this replaced, from git
        import types

        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:galbayes/catalog.py"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent).stdout
        mod = types.ModuleType("galbayes._old_catalog")
        mod.__package__ = "galbayes"
        sys.modules[mod.__name__] = mod  # dataclasses look their module up
        exec(compile(src, "old_catalog.py", "exec"), mod.__dict__)
        rows = mod.read_catalog(args.catalog, model=model)
        n = len(rows)
        extra = {}
    return {"case": args.case, "rows": n, "seconds": time.perf_counter() - t0, "rss_after_import_mb": base,
            "peak_rss_mb": rss_mb(), "delta_mb": rss_mb() - base, **extra}


def run_child(case: str, catalog: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--catalog", str(catalog), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--cases", nargs="*", default=["catalog", "runner"], choices=["catalog", "runner", "old"])
    p.add_argument("--old", action="store_true", help="also measure the replaced reader (needs git)")
    p.add_argument("--format", choices=["csv", "fits"], default="csv")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--catalog", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.case = args.child
        print(json.dumps(child(args)))
        return
    cases = list(args.cases) + (["old"] if args.old and "old" not in args.cases else [])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="galbayes-bench-memory-"))
    write_stamps(work)
    results = []
    print(f"| case | format | rows | peak RSS | RSS after import | growth | time |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        cat = write_catalog(work, n, args.format)
        for case in cases:
            r = run_child(case, cat, work / f"out_{case}_{n}")
            r["format"] = args.format
            results.append(r)
            print(f"| {case} | {args.format} | {r['rows']:,} | {r['peak_rss_mb']:.0f} MB | "
                  f"{r['rss_after_import_mb']:.0f} MB | {r['delta_mb']:.0f} MB | {r['seconds']:.1f} s |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"load": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""Run the test suite one test file per pytest process, a few processes at a time.

    python tools/run_tests.py [-j N] [FILE ...] [-- PYTEST-ARGS ...]

Why not one ``pytest`` process for everything: with jax/jaxlib 0.9.2, one long-lived process
that compiled and loaded ~190 tests' worth of XLA programs through the persistent
compilation cache aborted inside jaxlib's executable serialization (SIGSEGV in CI, SIGABRT
here, both times at the same test of tests/test_map.py, after ~40 minutes; that file alone
passes). See docs/known-issues.md. A process per file bounds what one process accumulates,
and two processes use both cores of a CI machine (XLA compiles on one thread).

The processes share one persistent XLA cache folder (``GALBAYES_TEST_XLA_DIR``, a temporary
folder removed at the end), so a program compiled by one file is loaded by the others, as
it was when the suite ran in one process. Every file's output goes to
``<log-dir>/<file>.log``; failures print their tail. The exit status is 0 only if every
file passed (a file whose pytest was killed by a signal counts as failed; "no tests
collected" counts as passed only for an empty selection made with ``-k``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The longest files first (measured on 2 cores), so the pool does not end on a long file.
FIRST = ["test_known_issues.py", "test_map.py", "test_runner.py", "test_faults.py", "test_laplace.py",
         "test_nuts.py", "test_notebooks.py", "test_batching.py", "test_prepare.py", "test_catalog.py",
         "test_cli.py", "test_compare.py", "test_bootstrap.py"]


def _files(names) -> list[Path]:
    if names:
        return [Path(n).resolve() for n in names]
    found = sorted((ROOT / "tests").glob("test_*.py"))
    rank = {name: i for i, name in enumerate(FIRST)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(FIRST)), p.name))


def _outcome(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return {0: "passed", 1: "failed", 5: "no tests collected"}.get(code, f"exit {code}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="test files (default: every tests/test_*.py)")
    ap.add_argument("-j", "--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="pytest processes at a time (default: 2, or 1 on a 1-core machine)")
    ap.add_argument("--log-dir", default=None, help="folder for the per-file logs (default: a temporary folder)")
    args = ap.parse_args(argv)

    files = _files(args.files)
    xla = tempfile.mkdtemp(prefix="galbayes-test-xla-")
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="galbayes-test-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GALBAYES_TEST_XLA_DIR=xla)
    pending, running, results = list(files), {}, []
    t_start = time.perf_counter()
    print(f"{len(files)} test files, {args.jobs} at a time; logs in {logs}", flush=True)
    try:
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                path = pending.pop(0)
                log = open(logs / f"{path.stem}.log", "w")
                cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       str(path), *extra]
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                running[proc] = (path, log, time.perf_counter())
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                path, log, t0 = running.pop(proc)
                log.close()
                code, dt = proc.returncode, time.perf_counter() - t0
                ok = code == 0 or (code == 5 and any(a.startswith("-k") for a in extra))
                results.append((path, code, dt, ok))
                text = (logs / f"{path.stem}.log").read_text(errors="replace").strip().splitlines()
                last = text[-1] if text else ""
                print(f"{'PASS' if ok else 'FAIL'} {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
                      f"  {dt:7.1f} s  {_outcome(code)}: {last}", flush=True)
                if not ok:
                    print("\n".join("    " + line for line in text[-60:]), flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.kill()
        raise
    finally:
        shutil.rmtree(xla, ignore_errors=True)
    failed = [r for r in results if not r[3]]
    wall = time.perf_counter() - t_start
    print(f"\n{len(results) - len(failed)}/{len(results)} test files passed in {wall:.0f} s "
          f"(sum of file times {sum(r[2] for r in results):.0f} s)", flush=True)
    for path, code, dt, _ in failed:
        print(f"  FAILED {path.name}: {_outcome(code)} (log: {logs / (path.stem + '.log')})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

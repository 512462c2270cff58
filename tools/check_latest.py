#!/usr/bin/env python3
"""Try galbayes against the newest releases of its dependencies and report what breaks.

pyproject.toml caps a few dependencies (jax/jaxlib < 0.10.2, arviz < 1; reasons in
docs/known-issues.md) and constraints.txt pins the exact set CI tests. This script ignores
both: it makes a fresh virtualenv, installs galbayes without dependencies, then the newest
release of every dependency, and runs

1. the crash reproducer (tools/repro_jaxlib_crash.py) natively and, when ``qemu-x86_64`` is
   installed, under an emulated AVX2-only CPU (Haswell: the class of CPU where jaxlib 0.10.2
   segfaults), one case per process so that a crash is reported, not fatal;
2. a quick subset of the test suite (or ``--tests all``).

It prints the versions it got and one line per check (ok / FAILED / CRASHED with the signal),
and exits 1 if anything broke. Nothing in the repository is changed.

    python tools/check_latest.py [--venv DIR] [--tests quick|all|none] [--no-emulation]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPS = ["jax", "jaxlib", "numpyro", "optax", "arviz", "astropy", "numpy", "scipy", "matplotlib", "tqdm",
        "pytest", "galsim", "pyimfit", "nbclient", "nbformat", "ipykernel", "dask", "distributed"]
WATCH = ["jax", "jaxlib", "numpyro", "optax", "arviz", "astropy", "numpy", "scipy"]
QUICK_TESTS = ["tests/test_special.py", "tests/test_psf.py", "tests/test_numpyro_model.py",
               "tests/test_laplace.py", "tests/test_nuts.py"]


def _describe(rc: int) -> str:
    if rc == 0:
        return "ok"
    if rc < 0:
        try:
            return f"CRASHED ({signal.Signals(-rc).name})"
        except ValueError:
            return f"CRASHED (signal {-rc})"
    return f"FAILED (exit {rc})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", help="virtualenv folder to create (default: a temporary one, removed after)")
    ap.add_argument("--tests", choices=["quick", "all", "none"], default="quick")
    ap.add_argument("--no-emulation", action="store_true", help="skip the emulated AVX2-CPU run")
    args = ap.parse_args(argv)

    venv = Path(args.venv) if args.venv else Path(tempfile.mkdtemp(prefix="galbayes-latest-"))
    py = venv / "bin" / "python"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade"] + DEPS, check=True)
        got = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                             check=True).stdout.splitlines()
        print("newest releases installed:")
        for line in got:
            if line.split("==")[0].lower() in WATCH:
                print("  " + line)
        results = {}
        repro = str(ROOT / "tools" / "repro_jaxlib_crash.py")
        for case in ("reduce7d", "fan", "hessian", "nuts"):
            results[f"reproducer {case} (this CPU)"] = subprocess.run([str(py), repro, case], cwd=ROOT).returncode
        qemu = shutil.which("qemu-x86_64")
        if qemu and not args.no_emulation:
            site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, str(ROOT)]))
            base = os.path.realpath(subprocess.run([str(py), "-c", "import sys; print(sys._base_executable)"],
                                                   capture_output=True, text=True, check=True).stdout.strip())
            for case in ("reduce7d", "fan"):
                rc = subprocess.run([qemu, "-cpu", "Haswell", base, repro, case], cwd=ROOT, env=env,
                                    stderr=subprocess.DEVNULL).returncode
                results[f"reproducer {case} (emulated AVX2 CPU)"] = rc
        elif not args.no_emulation:
            print("qemu-x86_64 not found (apt-get install qemu-user): emulated AVX2 run skipped")
        if args.tests != "none":
            tests = ["tests"] if args.tests == "all" else QUICK_TESTS
            results[f"pytest {args.tests}"] = subprocess.run([str(py), "-m", "pytest", "-q", "-x", *tests],
                                                             cwd=ROOT).returncode
        print("\nsummary (newest releases):")
        for name, rc in results.items():
            print(f"  {name:<40} {_describe(rc)}")
        return 0 if all(rc == 0 for rc in results.values()) else 1
    finally:
        if not args.venv:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

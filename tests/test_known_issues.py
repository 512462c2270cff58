"""Regression tests for docs/known-issues.md: programs that crashed a dependency.

jaxlib 0.10.x segfaults in XLA's CPU runtime on CPUs without AVX-512 (seen on AMD EPYC; the
same under an emulated Intel Haswell) when it runs galbayes' Hessian and NUTS programs;
pyproject.toml therefore caps jax/jaxlib below 0.10. Whether a host crashes depends on its CPU,
so the reproducer is run under ``qemu-x86_64 -cpu Haswell`` (user-mode emulation of an
AVX2-only CPU): the check is the same on every CI host. Each case runs in its own process,
so a crash fails the test instead of killing the test session.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPRO = ROOT / "tools" / "repro_jaxlib_crash.py"


def _outcome(proc) -> str:
    if proc.returncode < 0:
        return f"crashed with {signal.Signals(-proc.returncode).name}"
    return f"exit {proc.returncode}"


def _emulated(case: str, cpu: str = "Haswell", timeout: float = 1500.0):
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user; .ci/run installs it)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p] + [str(ROOT)]),
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return subprocess.run([qemu, "-cpu", cpu, python, str(REPRO), case], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", [
    "reduce7d",   # the minimal reproducer: one YNNPACK reduce fusion (jax only)
    "fan",        # galbayes' central fan quadrature under vmap(hessian): where it was found
])
def test_reproducer_runs_on_an_emulated_avx2_only_cpu(case):
    """The programs that crashed jaxlib 0.10.2 run to a correct, finite result on an AVX2-only
    CPU with the jax/jaxlib this package installs."""
    proc = _emulated(case)
    assert proc.returncode == 0, (f"{case}: {_outcome(proc)} under an emulated AVX2-only CPU; see "
                                  f"docs/known-issues.md\n{proc.stdout[-2000:]}\n{proc.stderr[-1500:]}")
    assert f"{case}: ran" in proc.stdout and "finite=True" in proc.stdout


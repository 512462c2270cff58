"""Test-session settings shared by every module."""
import atexit
import os
import shutil
import tempfile

import jax


def _share_compiled_programs():
    """Persistent XLA cache for this pytest process, so identical programs built from other
    Model objects (test_catalog, test_cli, test_map, ...) are compiled once; the folder
    ``GALBAYES_TEST_XLA_DIR`` if set (tools/run_tests.py shares one between its processes),
    else a temporary one; exported as ``GALBAYES_CACHE_DIR`` (unless set) so that subprocesses
    (CLI runs, notebook kernels) use it and never the user's own cache. Opt out with
    GALBAYES_TEST_JAX_CACHE=0; an already configured cache directory is left alone."""
    if os.environ.get("GALBAYES_TEST_JAX_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
    path = os.environ.get("GALBAYES_TEST_XLA_DIR")   # shared by tools/run_tests.py's processes
    if not path:
        path = tempfile.mkdtemp(prefix="galbayes-test-xla-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)
    os.environ.setdefault("GALBAYES_CACHE_DIR", path)   # subprocesses (CLI, notebook kernels) too
    from galbayes import cache

    cache._patch_atomic_writes()   # several processes may write the same entry at once


_share_compiled_programs()


def pytest_runtest_logreport(report):
    """With GALBAYES_TEST_TIMINGS=<file>, append each test phase's duration to that file as it
    finishes (a crash that kills the session still leaves the timings so far)."""
    path = os.environ.get("GALBAYES_TEST_TIMINGS")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{report.duration:9.2f} {report.when:8s} {report.outcome:7s} {report.nodeid}\n")

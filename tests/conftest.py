"""Test-session settings shared by every module."""
import atexit
import os
import shutil
import tempfile

import jax


def _share_compiled_programs():
    """Persistent XLA cache for this pytest process, so identical programs built from other
    Model objects (test_catalog, test_cli, test_map, ...) are compiled once. Opt out with
    GALBAYES_TEST_JAX_CACHE=0; an already configured cache directory is left alone."""
    if os.environ.get("GALBAYES_TEST_JAX_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
    path = tempfile.mkdtemp(prefix="galbayes-test-xla-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)


_share_compiled_programs()

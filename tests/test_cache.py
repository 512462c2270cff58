"""The persistent compilation cache: configuration rules, and that a second `galbayes fit`
in a fresh process with a different PYTHONHASHSEED compiles nothing (every program is a
cache hit), i.e. the traced programs do not depend on Python's hash seed.

Stamps are 24×24 Gaussians with a 7×7 PSF, a Gaussian model without oversampling and a tiny
iteration budget, so the cold compile stays short."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from galbayes import cache, errors

MODEL_TOML = 'oversample = []\n\n[components.g]\nprofile = "gaussian"\n'


def _gauss(size, xc, yc, s, flux):
    y, x = np.mgrid[:size, :size].astype(np.float64)
    g = np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2 * s * s))
    return flux * g / g.sum()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(3)
    fits.writeto(d / "psf.fits", _gauss(7, 3, 3, 1.2, 1.0))
    lines = ["id,image,sigma,psf"]
    for i in range(3):
        img = _gauss(24, 11.5 + 0.3 * i, 11.8, 2.0 + 0.2 * i, 50.0) + rng.normal(0, 0.05, (24, 24))
        fits.writeto(d / f"img{i}.fits", img.astype(np.float32))
        fits.writeto(d / f"sig{i}.fits", np.full((24, 24), 0.05, np.float32))
        lines.append(f"g{i},img{i}.fits,sig{i}.fits,psf.fits")
    (d / "catalog.csv").write_text("\n".join(lines) + "\n")
    (d / "model.toml").write_text(MODEL_TOML)
    return d


def _fit(catalog, out, cache_dir, seed):
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    env.pop("GALBAYES_TRACED", None)                 # stored programs: on by default
    env.pop(cache.ENV, None)
    cmd = [sys.executable, "-m", "galbayes", "fit", str(catalog / "catalog.csv"), "--model",
           str(catalog / "model.toml"), "--out", str(out), "--cache-dir", str(cache_dir),
           "--max-iter", "3", "--lm-iter", "3", "--batch-size", "2", "--no-blocks", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((Path(out) / "run.json").read_text())["timing"]


def test_second_process_with_another_hash_seed_compiles_nothing(catalog, tmp_path):
    xla = tmp_path / "xla"
    cold = _fit(catalog, tmp_path / "a", xla, seed=1)
    entries = sorted(p.name for p in xla.iterdir() if p.name.endswith("-cache"))
    assert cold["cache_misses"] >= 1 and entries, cold
    traced = sorted(p.name for p in (xla / "traced").iterdir())
    assert cold["traced_stored"] >= 1 and traced, cold            # the MAP program, traced once
    warm = _fit(catalog, tmp_path / "b", xla, seed=12345)
    print("\ncold:", cold, "\nwarm:", warm)
    assert warm["cache_misses"] == 0, (cold, warm)
    assert warm["cache_hits"] >= 1, warm
    assert warm["traced_loaded"] == cold["traced_stored"] and warm["traced_stored"] == 0, warm
    assert sorted(p.name for p in (xla / "traced").iterdir()) == traced
    # no new entry: the second run asked for exactly the programs of the first
    assert sorted(p.name for p in xla.iterdir() if p.name.endswith("-cache")) == entries
    assert not [p for p in xla.iterdir() if ".tmp-" in p.name]      # atomic writes left nothing
    a = (tmp_path / "a" / "results.csv").read_text()
    b = (tmp_path / "b" / "results.csv").read_text()
    assert a == b


def test_configuration_rules(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "env"))
    assert cache._requested() == tmp_path / "env"
    for off in ("off", "0", "", "none"):
        monkeypatch.setenv(cache.ENV, off)
        assert cache._requested() is None
    monkeypatch.delenv(cache.ENV)
    assert cache._requested() == cache.default_cache_dir()
    assert cache.default_cache_dir().parts[-2:] == ("galbayes", "xla")


def test_atomic_put_leaves_no_partial_file(tmp_path):
    class Fake:
        path = tmp_path
    cache._atomic_put(Fake(), "k1", b"abc")
    cache._atomic_put(Fake(), "k1", b"zzz")          # an existing key is kept
    assert (tmp_path / f"k1{cache._SUFFIX}").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == [f"k1{cache._SUFFIX}"]


def test_cache_is_off_by_default_where_jaxlib_crashes_loading_it(tmp_path, monkeypatch):
    """jaxlib < 0.10 on the CPU: the default cache is off with a warning; a folder the user
    names is used, with the same warning; jaxlib 0.10 or a GPU backend: no reason."""
    assert "SIGSEGV" in cache.cache_off_reason(jaxlib_version="0.9.2", backend="cpu")
    assert cache.cache_off_reason(jaxlib_version="0.4.30", backend="cpu") is not None
    assert cache.cache_off_reason(jaxlib_version="0.10.1", backend="cpu") is None
    assert cache.cache_off_reason(jaxlib_version="0.11.0rc1", backend="cpu") is None
    assert cache.cache_off_reason(jaxlib_version="0.9.2", backend="gpu") is None

    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    saved_state, saved_dir = dict(cache._state), jax.config.jax_compilation_cache_dir
    monkeypatch.setattr(cache, "cache_off_reason", lambda **kw: "jaxlib 0.0 crashes (test)")
    monkeypatch.setattr(errors, "_warned", set())
    monkeypatch.delenv(cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        with pytest.warns(RuntimeWarning, match="compilation cache is off: jaxlib 0.0 crashes"):
            assert cache.configure() is None
        assert cache.cache_dir() is None and jax.config.jax_compilation_cache_dir is None
        named = tmp_path / "named"
        with pytest.warns(RuntimeWarning, match="as asked, but jaxlib 0.0 crashes"):
            assert cache.configure(named) == named
        assert jax.config.jax_compilation_cache_dir == str(named)
        monkeypatch.setenv(cache.ENV, str(tmp_path / "env"))
        jax.config.update("jax_compilation_cache_dir", None)
        with pytest.warns(RuntimeWarning, match="as asked"):
            assert cache.configure() == tmp_path / "env"
    finally:
        jax.config.update("jax_compilation_cache_dir", saved_dir)
        cc.reset_cache()
        cache._state.clear()
        cache._state.update(saved_state)

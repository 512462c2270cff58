"""galbayes.compiled: one cache of jitted functions per model object, that dies with it."""
import copy
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galbayes import Component, Model, Observation
from galbayes.compiled import compiled
from galbayes.pipeline import render_batch


def _model():
    return Model([Component("sersic", "sersic")])


class _Counter:
    def __init__(self):
        self.n = 0

    def build(self, model):
        def make():
            self.n += 1
            return jax.jit(lambda x: x * len(model.keys))
        return make


def test_same_model_and_key_builds_once():
    m = _model()
    c = _Counter()
    f1 = compiled(m, ("k", 1), c.build(m))
    f2 = compiled(m, ("k", 1), c.build(m))
    assert f1 is f2 and c.n == 1
    f3 = compiled(m, ("k", 2), c.build(m))          # another key: built again
    assert f3 is not f1 and c.n == 2
    other = _model()                                  # an equal model: its own functions
    f4 = compiled(other, ("k", 1), c.build(other))
    assert f4 is not f1 and c.n == 3
    assert compiled(m, ("k", 1), c.build(m)) is f1 and c.n == 3


def test_copies_and_pickles_do_not_share_functions():
    m = _model()
    c = _Counter()
    f = compiled(m, ("k",), c.build(m))
    shallow = copy.copy(m)                            # shares the attribute: must not reuse
    assert compiled(shallow, ("k",), c.build(shallow)) is not f and c.n == 2
    assert compiled(m, ("k",), c.build(m)) is f and c.n == 2
    cloudpickle = pytest.importorskip("cloudpickle")       # how Dask sends a model to workers
    for clone in (copy.deepcopy(m), cloudpickle.loads(cloudpickle.dumps(m))):
        assert compiled(clone, ("k",), c.build(clone)) is not f
    assert c.n == 4


def test_model_is_freed_after_its_functions_ran():
    m = _model()
    c = _Counter()
    fn = compiled(m, ("k",), c.build(m))
    assert float(fn(jnp.float32(2.0))) == 2.0 * len(m.keys)
    ref = weakref.ref(m)
    del m, fn
    gc.collect()
    assert ref() is None


def test_model_is_freed_after_rendering():
    m = _model()
    batch, values = _scene_batch(m)
    img, comps = render_batch(m, batch, values)
    assert np.all(np.isfinite(np.asarray(img)))
    assert render_batch(m, batch, values)[0].shape == img.shape      # cached: no rebuild
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def _scene_batch(model):
    yy, xx = np.mgrid[:24, :24]
    image = np.exp(-((xx - 11.5) ** 2 + (yy - 12.0) ** 2) / 8.0).astype(np.float32)
    psf = np.exp(-((np.mgrid[:7, :7] - 3.0) ** 2).sum(0) / 2.0)
    obs = Observation(image=image, sigma=np.full_like(image, 0.1), psf=psf / psf.sum(), zp=22.5)
    batch = Model.stack([model.pack(obs)])
    return batch, np.asarray(batch.values0)

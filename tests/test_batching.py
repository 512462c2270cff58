"""Stamp/PSF buckets (galbayes.batching): a galaxy padded into a bucket renders and fits as at
its own size (to float32 rounding), with a tilted sky (whose centre is the real stamp's) and
with odd and even PSFs; plus the bucket and slot rules.

Small stamps (22×26), a Gaussian + tilted-sky model without oversampled boxes and a reduced
iteration budget keep the four compiled fit programs (two own shapes, two buckets) short."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galbayes.batching import (BUCKET_SIZES, PSF_BUCKET_SIZES, bucket_groups, bucket_shapes, bucket_size,
                               bucketed, group_by_shape, slot_count, to_bucket)
from galbayes.data import Observation
from galbayes.inference.map import fit_map
from galbayes.model import Model
from galbayes.recipe import recipe_from_dict

SHAPE = (22, 26)
BUDGET = dict(max_iter=5, lm_iter=12)


def _gauss(shape, xc, yc, s):
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    g = np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2 * s * s))
    return g / g.sum()


@pytest.fixture(scope="module")
def model():
    return recipe_from_dict({"oversample": [], "components": {"g": {"profile": "gaussian"},
                                                                "sky": {"profile": "tilted_sky"}}})


def _observations(psf_size, count=3, seed=0):
    rng = np.random.default_rng(seed)
    c = (psf_size - 1) / 2
    psf = _gauss((psf_size, psf_size), c, c, 1.1)
    obs = []
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(np.float64)
    for i in range(count):
        xc, yc = 12.0 + 0.7 * i, 10.3 + 0.4 * i
        img = 40.0 * _gauss(SHAPE, xc, yc, 2.0 + 0.3 * i) + 0.05 + 0.004 * (x - 12.5) - 0.003 * (y - 10.5)
        img = img + rng.normal(0, 0.02, SHAPE)
        obs.append(Observation(image=img.astype(np.float32), sigma=np.full(SHAPE, 0.02, np.float32),
                               psf=psf.astype(np.float32), id=f"p{psf_size}_{i}"))
    return obs


@pytest.mark.parametrize("psf_size, bucket_psf", [(7, 11), (6, 9)])
def test_fit_in_a_bucket_equals_fit_at_own_size(model, psf_size, bucket_psf):
    gals = [model.pack(o) for o in _observations(psf_size)]
    own = Model.stack(gals)
    padded = Model.stack([to_bucket(g, (32, 32), (bucket_psf, bucket_psf)) for g in gals])
    assert padded.image.shape[1:] == (32, 32) and padded.psf.shape[1:] == (bucket_psf, bucket_psf)
    # the model image inside the real stamp is the same at the same parameters
    values = jnp.asarray(own.values0)
    a = jax.vmap(model.render)(values, jax.tree_util.tree_map(jnp.asarray, own))
    b = jax.vmap(model.render)(values, jax.tree_util.tree_map(jnp.asarray, padded))
    np.testing.assert_allclose(np.asarray(b)[:, : SHAPE[0], : SHAPE[1]], np.asarray(a),
                               rtol=0, atol=2e-6 * float(np.max(np.abs(a))))
    r1 = fit_map(model, own, **BUDGET)
    r2 = fit_map(model, padded, **BUDGET)
    dv = np.abs(r1.values - r2.values)
    print(f"\nPSF {psf_size} -> {bucket_psf}: max |dv| {dv.max(axis=0)}, "
          f"max |dchi2|/chi2 {np.max(np.abs(r1.chi2 - r2.chi2) / r1.chi2):.2e}, n_iter {r1.n_iter} {r2.n_iter}")
    np.testing.assert_allclose(r2.values, r1.values, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(r2.chi2, r1.chi2, rtol=1e-5)
    np.testing.assert_allclose(r2.loglike, r1.loglike, rtol=1e-5)
    assert np.all(r1.converged == r2.converged)
    # the tilted sky is about the real stamp's centre: its gradient was found in both
    k = model.keys
    assert np.all(np.abs(r2.values[:, k.index("sky_dsky_dx")] - 0.004) < 2e-3)


def test_padding_rules(model):
    gal = model.pack(_observations(6, count=1)[0])
    b = to_bucket(gal, (32, 40), (9, 9))
    ny, nx = SHAPE
    assert np.all(b.weight[ny:, :] == 0) and np.all(b.weight[:, nx:] == 0)
    assert np.all(b.sigma[ny:, :] == 1) and np.all(b.image[:, nx:] == 0)
    np.testing.assert_array_equal(b.image[:ny, :nx], gal.image)
    # the PSF's centre pixel ((k-1)//2) stays its centre, the flux is unchanged
    assert b.psf[(9 - 1) // 2, (9 - 1) // 2] == gal.psf[(6 - 1) // 2, (6 - 1) // 2]
    assert np.isclose(b.psf.sum(), gal.psf.sum())
    np.testing.assert_array_equal(b.centre, gal.centre)
    np.testing.assert_array_equal(b.values0, gal.values0)
    np.testing.assert_array_equal(b.lo, gal.lo)
    assert to_bucket(gal, SHAPE, (6, 6)) is gal


def test_bucket_and_slot_rules(model):
    assert bucket_size(128) == 128 and bucket_size(129) == 192 and bucket_size(65) == 96
    assert all(b / a <= 1.5 for a, b in zip(BUCKET_SIZES[1:], BUCKET_SIZES[2:]))
    assert all(k % 2 == 1 for k in PSF_BUCKET_SIZES if k > 9)
    assert bucket_shapes((128, 128), (41, 41)) == ((128, 128), (41, 41))
    assert bucket_shapes((100, 70), (40, 31)) == ((128, 96), (41, 33))
    assert [slot_count(n, 8) for n in (1, 2, 3, 5, 8, 9, 100)] == [1, 2, 4, 8, 8, 8, 8]
    g1 = model.pack(_observations(7, count=1)[0])
    packed = [("a", g1), ("b", to_bucket(g1, (24, 28), (7, 7))), ("c", g1)]
    assert [[i for i, _ in grp] for grp in group_by_shape(packed)] == [["a", "c"], ["b"]]
    assert [[i for i, _ in grp] for grp in group_by_shape(packed, buckets=True)] == [["a", "b", "c"]]
    assert {np.shape(g.image) for _, g in bucketed(packed)} == {(24, 32)}


def test_small_groups_join_a_larger_bucket():
    """A bucket group that cannot fill one batch joins the smallest bucket in use that holds
    it on every axis (stamp and PSF), chains of small groups end in a group that can hold
    them, and a small group with no such host stays on its own."""
    from types import SimpleNamespace

    def gal(ny, nx, k):
        return SimpleNamespace(image=np.zeros((ny, nx)), psf=np.zeros((k, k)))

    packed = ([(f"s{i}", gal(60, 60, 41)) for i in range(3)]        # bucket 64²/41²: 3 galaxies
              + [(f"m{i}", gal(90, 90, 41)) for i in range(2)]      # 96²/41²: 2
              + [(f"l{i}", gal(120, 120, 41)) for i in range(9)]    # 128²/41²: 9
              + [(f"w{i}", gal(60, 60, 57)) for i in range(2)]      # 64²/57²: no bucket holds its PSF
              + [(f"x{i}", gal(100, 100, 33)) for i in range(8)])   # 128²/33²: full, stays
    keys = {key: [gid for gid, _ in items] for key, items in bucket_groups(packed, min_group=8)}
    # 64²/41² → 64²/57² (canvas 120², against 136² for 96²/41²), which has no host itself;
    # 96²/41² → 128²/41²
    assert keys == {((128, 128), (41, 41)): [f"l{i}" for i in range(9)] + ["m0", "m1"],
                    ((64, 64), (57, 57)): ["w0", "w1", "s0", "s1", "s2"],
                    ((128, 128), (33, 33)): [f"x{i}" for i in range(8)]}
    # without the 64²/57² group the 64²/41² one joins 96²/41², which then holds 5 < 8 and
    # joins 128²/41²: the same end as joining 128² directly
    chain = {key: [gid for gid, _ in items] for key, items in bucket_groups(packed[:14], min_group=8)}
    assert chain == {((128, 128), (41, 41)): [f"l{i}" for i in range(9)] + ["m0", "m1", "s0", "s1", "s2"]}
    # min_group 1 (or groups at least that large): one group per bucket, as group_by_shape
    plain = bucket_groups(packed, min_group=1)
    assert [[g for g, _ in items] for _, items in plain] == [[g for g, _ in grp]
                                                              for grp in group_by_shape(packed, buckets=True)]
    assert len(bucket_groups(packed, min_group=2)) == 5
    assert [len(items) for _, items in bucket_groups(packed[:3], min_group=8)] == [3]     # no host at all

"""Several devices on one machine (galbayes.devices): each batch is split over every JAX device.

CPU host devices stand in for GPUs: ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
must be set before JAX is imported, so the two-device run happens in a subprocess and is
compared with a one-device run in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from galbayes.devices import active_mesh, pad_leading, padded_to_devices, use_devices
from test_runner import BATCH, FIT, MODEL_CFG, run, write_catalog


def test_padding_helpers():
    assert [padded_to_devices(n, 2) for n in (1, 2, 3, 8, 9)] == [2, 2, 4, 8, 10]
    assert padded_to_devices(0, 4) == 4 and padded_to_devices(5, 1) == 5
    tree = {"a": np.arange(3.0), "b": np.arange(6).reshape(3, 2)}
    out = pad_leading(tree, 5)
    assert out["a"].tolist() == [0, 1, 2, 2, 2] and out["b"][-1].tolist() == [4, 5]


def test_one_device_installs_no_mesh():
    with use_devices() as mesh:
        assert (mesh is None) == (jax.device_count() == 1)
        assert active_mesh() is mesh
    assert active_mesh() is None
    with pytest.raises(ValueError, match="asked for"):
        with use_devices(jax.device_count() + 1):
            pass


def test_two_devices_give_the_same_results_as_one(tmp_path):
    cat = write_catalog(tmp_path, 32)
    one = tmp_path / "one"
    run(cat, one, shard_size=16, blocks=True)
    two = tmp_path / "two"
    script = textwrap.dedent(f"""
        import json
        import jax
        import galbayes.devices as D
        from galbayes.pipeline import fit_catalog
        from galbayes.recipe import recipe_from_dict

        seen = []
        _shard = D.shard_batch
        def spy(tree, mesh):
            out, n = _shard(tree, mesh)
            seen.append([n, int(jax.tree_util.tree_leaves(out)[0].shape[0]),
                         len(jax.tree_util.tree_leaves(out)[0].sharding.device_set)])
            return out, n
        D.shard_batch = spy
        fit_catalog({str(cat)!r}, recipe_from_dict({MODEL_CFG!r}), {str(two)!r}, batch_size={BATCH},
                    shard_size=16, blocks=True, progress=False, **{FIT!r})
        # a batch that does not divide evenly is padded with copies of its last galaxy
        import numpy as np
        with D.use_devices() as mesh:
            tree, n = _shard({{"x": np.arange(5.0)}}, mesh)
        print(json.dumps({{"devices": jax.device_count(), "batches": seen, "odd": [n, tree["x"].shape[0],
                          np.asarray(tree["x"]).tolist()]}}))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["devices"] == 2
    # every batch of 8 was split 4 + 4 over the two devices
    assert info["batches"] and all(b == [8, 8, 2] for b in info["batches"])
    assert info["odd"] == [5, 6, [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]]
    # Two devices run a differently partitioned program (4 galaxies per device instead of 8),
    # which XLA may vectorise differently: the answers agree to float32 rounding, not always bit
    # for bit (seen: one last-bit difference in results.fits).
    from astropy.table import Table

    t1, t2 = Table.read(one / "results.fits"), Table.read(two / "results.fits")
    assert t1.colnames == t2.colnames and len(t1) == len(t2) == 32
    worst = 0.0
    for c in t1.colnames:
        a, b = np.asarray(t1[c]), np.asarray(t2[c])
        if a.dtype.kind in "fc":
            assert np.array_equal(np.isnan(a), np.isnan(b)), c
            ok = ~np.isnan(a)
            rel = np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1.0)
            if c == "loglike":   # a difference of large terms (eq. 17 about chi2 = k): absolute
                assert np.all(np.abs(a[ok] - b[ok]) <= 1e-3), (c, float(np.abs(a[ok] - b[ok]).max()))
                continue
            worst = max(worst, float(rel.max(initial=0.0)))
            assert np.all(rel <= 1e-5), (c, float(rel.max()))
        else:
            assert np.array_equal(a, b), c
    print(f"\none vs two devices: max relative difference {worst:.2e}")
    blocks = sorted(p.name for p in (one / "blocks").glob("*.fits"))
    assert blocks == sorted(p.name for p in (two / "blocks").glob("*.fits")) and len(blocks) == 32

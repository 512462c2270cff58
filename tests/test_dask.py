"""Several machines: shards as Dask tasks on a LocalCluster of worker processes, one of
which is killed mid-run; the run completes with every row and the values of a local run."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from test_runner import run, write_catalog  # noqa: E402

_SLOW_DOWN = """
import time
import galbayes.runner as R
if not getattr(R, "_test_slowed", False):
    _orig = R._finish_shard
    def _slow(*a, **k):
        time.sleep(0.5)
        return _orig(*a, **k)
    R._finish_shard = _slow
    R._test_slowed = True
"""


def test_local_cluster_survives_a_killed_worker(tmp_path):
    n_rows, shard = 96, 8
    cat = write_catalog(tmp_path, n_rows)
    reference = run(cat, tmp_path / "local", shard_size=shard)
    out = tmp_path / "dask"
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    client = distributed.Client(cluster)
    killed = {}

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            if list((out / "shards").glob("shard_*.fits")):
                busy = [w for w, keys in client.processing().items() if keys]
                if busy:
                    killed["worker"] = busy[0]
                    os.kill(pids[busy[0]], signal.SIGKILL)  # mid-shard: its task is lost
                    return
            time.sleep(0.05)

    try:
        client.run(exec, _SLOW_DOWN, {})  # ~0.5 s per shard so the kill lands mid-run
        pids = client.run(os.getpid)
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        table = run(cat, out, shard_size=shard, dask=client)
        thread.join(timeout=5)
        workers_after = set(client.scheduler_info()["workers"])
    finally:
        client.close()
        cluster.close()
    assert killed, "no worker was killed"
    assert killed["worker"] not in workers_after  # that process is gone (the nanny started another)
    assert list(table["id"]) == [f"g{j:05d}" for j in range(n_rows)]  # every row, once, in order
    for c in reference.colnames:
        assert np.array_equal(np.asarray(table[c]), np.asarray(reference[c])), c
    for name in ("results.fits", "results.csv"):
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == n_rows // shard


def test_dask_option_parsing():
    from galbayes.cli import build_parser
    from galbayes.runner import _dask_client

    args = build_parser().parse_args(["fit", "c.csv", "--model", "m", "--out", "o", "--resume",
                                      "--shard-size", "32", "--dask", "local:2"])
    assert args.resume and args.shard_size == 32 and args.dask == "local:2"
    with pytest.raises(ValueError, match="at least one worker"):
        _dask_client("local:0")

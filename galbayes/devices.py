"""Data parallelism over the JAX devices of one machine (several GPUs, or CPU host devices).

A batch of galaxies is split along its leading (galaxy) axis over every device of a
one-dimensional :class:`jax.sharding.Mesh`: each leaf of the stacked
:class:`~galbayes.model.GalaxyArrays` is placed with
``NamedSharding(mesh, PartitionSpec("galaxies"))`` and the jitted, vmapped fit of
:func:`galbayes.inference.map.fit_map` then runs its share of the galaxies on each device
(XLA partitions the program; per-galaxy results do not depend on where a galaxy ran).
A batch whose size is not a multiple of the device count is padded by repeating its last
galaxy; the padding is dropped from the results.

Usage::

    from galbayes.devices import use_devices
    with use_devices():              # every device JAX sees; a no-op with one device
        res = fit_map(model, batch)  # sharded over the devices

The catalog runner (:mod:`galbayes.runner`) does this for you. To try it on a CPU-only
machine, expose several host devices *before* JAX is imported::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 galbayes fit ...
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .batching import pad_rows
from .errors import OptionsError

__all__ = ["AXIS", "galaxy_mesh", "batch_sharding", "use_devices", "active_mesh", "n_devices",
           "padded_to_devices", "pad_leading", "shard_batch", "place_batch", "place_tree", "data_parallel"]

#: Name of the mesh axis the galaxies are split over.
AXIS = "galaxies"

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("galbayes_mesh", default=None)


def galaxy_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of the default backend)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise OptionsError("no JAX devices given")
    return Mesh(np.asarray(devices, dtype=object), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (galaxy) axis over the mesh; every other axis stays whole."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def n_devices(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.devices.size)


def padded_to_devices(n: int, count: int) -> int:
    """The smallest multiple of ``count`` that is ≥ ``n`` (and ≥ ``count``)."""
    count = max(int(count), 1)
    return max(-(-int(n) // count), 1) * count


#: Pad every leaf along axis 0 to ``size`` by repeating its last entry (one rule, in batching).
pad_leading = pad_rows


def shard_batch(tree, mesh: Mesh):
    """Pad ``tree`` (leading axis = galaxies) to a multiple of the device count and place it
    split over ``mesh``. Returns ``(sharded tree, original size)``."""
    leaves = jax.tree_util.tree_leaves(tree)
    n = int(np.shape(leaves[0])[0])
    size = padded_to_devices(n, n_devices(mesh))
    sharding = batch_sharding(mesh)
    tree = pad_leading(tree, size) if size != n else tree
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree), n


@contextlib.contextmanager
def use_devices(devices=None):
    """Within the block, :func:`~galbayes.inference.map.fit_map` splits each batch over devices.

    Parameters
    ----------
    devices : None, int, sequence of jax.Device, or Mesh
        ``None``: every device of the default backend; an int: the first that many; a mesh
        is used as given. With a single device nothing changes (no mesh is installed).
    """
    if isinstance(devices, Mesh):
        mesh = devices
    else:
        if devices is None:
            devs = jax.devices()
        elif isinstance(devices, int):
            all_devs = jax.devices()
            if not 1 <= devices <= len(all_devs):
                raise OptionsError(f"asked for {devices} devices; JAX sees {len(all_devs)}")
            devs = all_devs[:devices]
        else:
            devs = list(devices)
        mesh = galaxy_mesh(devs) if len(devs) > 1 else None
    token = _ACTIVE.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh installed by :func:`use_devices` in this context, or None."""
    return _ACTIVE.get()


def place_batch(batch, keys):
    """Put a batch and its per-galaxy PRNG keys where the active mesh wants them.

    Without a mesh: device arrays on the default device (already-placed arrays, including
    sharded ones, are kept as they are). With a mesh: both are padded to a multiple of the
    device count and split over the galaxy axis. Returns ``(batch, keys, n)`` with ``n`` the
    number of real galaxies (slice results with ``[:n]``).
    """
    n = int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])
    mesh = active_mesh()
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, batch), keys, n
    batch, _ = shard_batch(batch, mesh)
    keys, _ = shard_batch(keys, mesh)
    return batch, keys, n


def place_tree(tree):
    """Device arrays of ``tree`` (leading axis = galaxies) where the active mesh wants them:
    split over its devices (the leading size must be a multiple of the device count), or on
    the default device without a mesh."""
    mesh = active_mesh()
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, tree)
    return shard_batch(tree, mesh)[0]


def data_parallel(fn):
    """``fn`` (a jitted, vmapped per-galaxy function of arrays with a leading galaxy axis)
    run on every device of the active mesh, each on its own block of galaxies.

    The inputs must be placed with :func:`place_batch` (split over the mesh). The compiled
    single-device program of ``fn`` is dispatched once per device on that device's block
    (JAX dispatch is asynchronous, so the devices run concurrently) and the per-device
    outputs are joined into arrays split the same way. A device's program is therefore
    exactly the one-device program on fewer galaxies: per-galaxy results are bit-identical
    to a one-device run, and each device stops iterating when its own galaxies have
    converged. (An SPMD-partitioned program — ``jit`` over the sharded batch, or
    ``shard_map`` — is compiled differently by XLA and differs in the last bits.)
    Without an active mesh ``fn`` is returned unchanged.
    """
    mesh = active_mesh()
    if mesh is None:
        return fn
    sharding = batch_sharding(mesh)

    def run(*args):
        leaves, treedef = jax.tree_util.tree_flatten(args)
        n = int(leaves[0].shape[0])
        per_device = []
        for dev in mesh.devices.flat:
            local = []
            for leaf in leaves:
                if not isinstance(leaf, jax.Array) or leaf.sharding != sharding:
                    leaf = jax.device_put(leaf, sharding)
                local.append(next(s.data for s in leaf.addressable_shards if s.device == dev))
            per_device.append(fn(*jax.tree_util.tree_unflatten(treedef, local)))
        outs = []
        for parts in zip(*(jax.tree_util.tree_leaves(o) for o in per_device)):
            shape = (n,) + tuple(parts[0].shape[1:])
            outs.append(jax.make_array_from_single_device_arrays(shape, sharding, list(parts)))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(per_device[0]), outs)

    return run

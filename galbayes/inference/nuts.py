"""NUTS refinement of chosen galaxies: posteriors, R-hat, ESS, divergences.

Design: one single-galaxy NUTS, vectorised over galaxies *and* chains
---------------------------------------------------------------------------
numpyro's functional NUTS (``numpyro.infer.hmc.hmc(potential_fn_gen=..., algo="NUTS")``)
gives ``init_kernel``/``sample_kernel`` whose potential is built from *model arguments*; the
model argument here is one galaxy's :class:`~galbayes.model.GalaxyArrays`, so
``jax.vmap`` over galaxies (and, nested, over chains) runs every chain of every galaxy in
one jitted ``lax.scan``. Each (galaxy, chain) keeps its own step size, dense mass matrix
(adapted with numpyro's windowed Welford scheme), tree depth and divergence record, exactly
as if it were sampled alone: the batch changes the cost, not the Markov chains.

The cost: under ``vmap`` NUTS's tree-building ``while_loop`` runs until the *longest*
trajectory of the batch is finished, so one iteration costs the largest tree of the batch
(masked lanes idle); a pathological galaxy (e.g. q at its bound) slows its whole batch,
which ``max_tree_depth`` caps. Batching pays when evaluating many galaxies' gradients in
one vectorised pass is much cheaper than one by one — on a GPU (not measured here). On the
2-core CPU of ``benchmarks/bench_errors.py`` a CPU gains nothing from wider vectors: 8
galaxies × 4 chains together gave 0.6× the ESS/s of one galaxy (its 4 chains vectorised)
at a time, the difference being the idle lanes; :func:`galbayes.sampling.sample_results` runs one
galaxy at a time on CPU by default (``batch_size``).

The alternative — one NUTS over the stacked (galaxy × parameter) vector, whose target is
block-diagonal — shares one step size and one trajectory among all galaxies: the joint
energy error grows with the number of galaxies (so the step size must shrink), one
galaxy's divergence rejects everyone's transition, and a dense mass matrix over the whole
vector costs (B·S)² (numpyro's block ``dense_mass`` lists would recover the blocks, but not
the shared step size). Per-galaxy kernels avoid all that.

Chains start at the MAP (numpyro's ``init_to_value`` semantics). NUTS runs in *whitened*
unconstrained coordinates ``u``: ``z = z_MAP + L u`` with ``L Lᵀ`` the inverse Gauss–Newton
curvature of the potential in numpyro's unconstrained space (a Laplace covariance; a
constant linear map, so the target is unchanged up to a constant). Without it the
posterior widths in ``z`` are ~1e-3 (a centre known to 0.02 px within bounds 48 px wide)
and numpyro's mass-matrix regularisation (shrinkage towards 1e-3·I) swamps the adapted
covariance, giving step sizes far too small and ~45 leapfrog steps per draw; whitened, the
posterior is ~N(0, I) and draws take ~7 steps (measured). The dense mass matrix is still
adapted on top.

Divergences and pixel integration
---------------------------------
NUTS needs a smooth target. With the default pixel integration (sub-pixels in the central
box plus the triangle-fan quadrature of the central pixels) the χ² surface is smooth in the
centre and no divergences were seen (16 calibration realisations × 4 chains × 400 draws,
and the well-posed test). A model built with a coarser ``oversample`` (e.g. ``((11, 5),)``,
no fan) has tiny kinks where the centre crosses a sub-pixel sample of the cusp; NUTS reports
them as occasional divergences (0.02% of transitions on 398 realisations), harmless for the
intervals but worth knowing when reading the diagnostics.

Likelihood
----------
``likelihood="gaussian"`` (default) samples the posterior with independent Gaussian pixels,
whose width is the statistical uncertainty of the parameters given σ. The paper's
χ²-distribution likelihood (``"chi2"``) is selectable, but its density depends on the
parameters only through χ² and peaks on the shell χ² = k − 2, with a curvature of order 1/k
of the Gaussian one at the χ² minimum (see :mod:`galbayes.inference.laplace`): its
"posterior" spreads over the region where χ² is near its expected value, Δχ² ~ √(2k) above
the minimum, instead of Δχ² ~ 1, so its widths are ~(2k)^¼ times the statistical errors
(~13× for a 128×128 stamp) and not calibrated.

Outputs are in user units (px or arcsec, degrees, magnitudes): the sampled latent sites
(``<key>_log10`` for log parameters) are mapped back like numpyro's deterministic sites.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.hmc import hmc
from numpyro.infer.util import constrain_fn, potential_energy, unconstrain_fn

from ..compiled import compiled
from ..likelihood import check_likelihood
from ..model import GalaxyArrays, Model
from .laplace import invert_curvature, values_into_bounds

__all__ = ["NutsResult", "run_nuts", "to_inference_data", "save_posteriors", "summary_rows",
           "pointwise_loglike"]


class NutsResult(NamedTuple):
    """NUTS output for a batch of galaxies (leading axis = galaxy, in input order).

    samples : (B, C, D, E) every entry in user units (fixed entries constant).
    r_hat : (B, S) rank-normalised split R-hat of each free parameter (ArviZ).
    ess_bulk : (B, S) bulk effective sample size.
    divergences : (B,) post-warmup divergent transitions, all chains.
    mean_tree_steps : (B,) mean leapfrog steps per draw.
    step_size : (B, C) adapted step sizes.
    accept_prob : (B,) mean acceptance probability after warmup.
    potential : (B, C, D) potential energy (−log posterior in unconstrained space).
    diverging, num_steps : (B, C, D) per-draw divergence flags and leapfrog steps.
    likelihood : str
    free_keys, keys : lists of parameter names
    wall_time : float, seconds for sampling + transforms (compilation included on the
        first call of a given configuration; see ``compile_time``).
    compile_time : float
    """

    samples: np.ndarray
    r_hat: np.ndarray
    ess_bulk: np.ndarray
    divergences: np.ndarray
    mean_tree_steps: np.ndarray
    step_size: np.ndarray
    accept_prob: np.ndarray
    potential: np.ndarray
    diverging: np.ndarray
    num_steps: np.ndarray
    likelihood: str
    free_keys: list
    keys: list
    wall_time: float
    compile_time: float

    def summary(self, j: int) -> dict:
        """Per free parameter of galaxy ``j``: mean, sd, r_hat, ess_bulk."""
        out = {}
        for s, key in enumerate(self.free_keys):
            col = self.keys.index(key)
            x = self.samples[j, :, :, col]
            out[key] = {"mean": float(np.mean(x)), "sd": float(np.std(x)),
                        "r_hat": float(self.r_hat[j, s]), "ess_bulk": float(self.ess_bulk[j, s])}
        return out


def _site_names(model: Model) -> list:
    """Latent sample-site names in flattening order (sorted, as a dict pytree flattens)."""
    return sorted(model.site_names)


def _program(model: Model, likelihood: str, chains: int, draws: int, warmup: int,
             dense_mass: bool, target_accept: float, max_tree_depth: int):
    names = _site_names(model)
    kw = {"likelihood": likelihood}

    def unravel(x):
        return {k: x[i] for i, k in enumerate(names)}

    # model_args = (galaxy, z_MAP, L): the target in whitened coordinates u, z = z_MAP + L u
    def potential_gen(gal, z0, chol):
        return lambda u: potential_energy(model.numpyro_model, (gal,), kw, unravel(z0 + chol @ u))

    def to_values(u, gal, z0, chol):
        sites = constrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, unravel(z0 + chol @ u))
        return model.values_from_sites(sites, gal)

    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

    def init_one(gal, z0, chol, key):
        return init_kernel(jnp.zeros_like(z0), warmup, dense_mass=dense_mass,
                           target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                           model_args=(gal, z0, chol), rng_key=key)

    def step_one(state, gal, z0, chol):
        return sample_kernel(state, model_args=(gal, z0, chol))

    # galaxies (axis 0) × chains (axis 1); a galaxy's arrays are shared by its chains
    init_all = jax.vmap(jax.vmap(init_one, in_axes=(None, None, None, 0)), in_axes=(0, 0, 0, 0))
    step_all = jax.vmap(jax.vmap(step_one, in_axes=(0, None, None, None)), in_axes=(0, 0, 0, 0))
    values_all = jax.vmap(jax.vmap(jax.vmap(to_values, in_axes=(0, None, None, None)),
                                   in_axes=(0, None, None, None)), in_axes=(0, 0, 0, 0))

    def run(z0, chol, batch, keys):
        state = init_all(batch, z0, chol, keys)

        # One scan over warmup + draws (a single copy of the NUTS body to compile); the
        # warmup part of the trace is dropped afterwards.
        def step(s, _):
            s = step_all(s, batch, z0, chol)
            return s, (s.z, s.diverging, s.num_steps, s.accept_prob, s.potential_energy)

        state, trace = jax.lax.scan(step, state, None, length=warmup + draws)
        z, div, nsteps, acc, pe = (t[warmup:] for t in trace)
        # scan stacks draws first: (D, B, C, ...) → (B, C, D, ...)
        z = jnp.moveaxis(z, 0, 2)
        vals = values_all(z, batch, z0, chol)
        return (vals, jnp.moveaxis(div, 0, 2), jnp.moveaxis(nsteps, 0, 2), jnp.moveaxis(acc, 0, 2),
                jnp.moveaxis(pe, 0, 2), state.adapt_state.step_size)

    return jax.jit(run)


def _get_program(model, *args):
    """``(model, program, compiled executables by argument shapes)`` of a model and sampler
    settings (cached on the model by :func:`galbayes.compiled.compiled`)."""
    return compiled(model, ("nuts_program",) + args, lambda: (model, _program(model, *args), {}))


def _one_fisher_z(model: Model, values, gal: GalaxyArrays):
    """Gauss–Newton curvature Jzᵀ W Jz of χ²/2 in numpyro's unconstrained coordinates, plus
    the curvature of the bijection's log-Jacobian (forward mode only: cheap to compile)."""
    names = _site_names(model)
    sites = model.site_values(values, gal)
    z0 = unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, sites)
    x0 = jnp.stack([z0[k] for k in names])

    def unravel(x):
        return {k: x[i] for i, k in enumerate(names)}

    def pixels(x):
        s = constrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, unravel(x))
        return model.render(model.values_from_sites(s, gal), gal).reshape(-1)

    def prior_grad(x):
        return jax.grad(lambda y: potential_energy(model.numpyro_model, (gal,), {"likelihood": "none"},
                                                   unravel(y)))(x)

    jac = jax.jacfwd(pixels)(x0)
    w = (gal.weight / jnp.square(gal.sigma)).reshape(-1)
    return jnp.einsum("ns,n,nt->st", jac, w, jac) + jax.jacfwd(prior_grad)(x0)


def _whitening(model: Model, batch: GalaxyArrays, values) -> np.ndarray:
    """Cholesky factor of the (Gauss–Newton) Laplace covariance in numpyro's unconstrained
    space, per galaxy; a diagonal guess where it is not positive definite (the warmup adapts
    the mass matrix on top anyway)."""
    fisher = compiled(model, ("nuts_fisher",), lambda: jax.jit(jax.vmap(lambda v, g: _one_fisher_z(model, v, g))))
    mats = np.asarray(fisher(jnp.asarray(values, jnp.float32),
                             jax.tree_util.tree_map(jnp.asarray, batch)), np.float64)
    s = model.n_free
    out = np.zeros((values.shape[0], s, s), np.float32)
    for j, m in enumerate(mats):
        _, cov, _ = invert_curvature(m, keys=model.free_keys)
        try:
            if not np.all(np.isfinite(cov)):
                raise np.linalg.LinAlgError
            out[j] = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            d = np.abs(np.diag(m))
            out[j] = np.diag(np.sqrt(np.where(d > 0, 1.0 / np.maximum(d, 1e-30), 1.0).clip(1e-12, 1.0)))
    return out


def run_nuts(model: Model, batch: GalaxyArrays, values, *, chains: int = 4, draws: int = 1000,
             warmup: int = 500, seed: int = 0, likelihood: str = "gaussian", dense_mass: bool = True,
             target_accept: float = 0.8, max_tree_depth: int = 8,
             batch_size: int | None = None) -> NutsResult:
    """Run NUTS for every galaxy of ``batch`` (all chains of all galaxies vectorised).

    Parameters
    ----------
    model : Model
    batch : GalaxyArrays
        Stacked galaxies.
    values : (B, E)
        Starting point (the MAP) of every entry in user units.
    chains, draws, warmup : int
        Chains per galaxy, kept draws per chain, warmup (adaptation) iterations.
    likelihood : {"gaussian", "chi2"}
        Pixel likelihood (Gaussian by default; see the module docstring).
    dense_mass : bool
        Dense (default) or diagonal mass matrix per galaxy.
    target_accept, max_tree_depth : NUTS settings (the vectorised batch waits for its
        deepest tree, so the depth cap also caps the cost of a pathological galaxy).
    batch_size : int, optional
        Galaxies per jitted run (padded to one shape); default all at once.

    Returns
    -------
    NutsResult
    """
    likelihood = check_likelihood(likelihood)
    batch = jax.tree_util.tree_map(np.asarray, batch)
    values = values_into_bounds(model, batch, np.atleast_2d(np.asarray(values, np.float64)))
    n_gal = values.shape[0]
    size = n_gal if not batch_size or batch_size >= n_gal else int(batch_size)
    settings = (likelihood, chains, draws, warmup, dense_mass, target_accept, max_tree_depth)
    parts = []
    for c, start in enumerate(range(0, n_gal, size)):
        idx = np.arange(start, min(start + size, n_gal))
        n_real = len(idx)
        idx = np.concatenate([idx, np.full(size - n_real, idx[-1])])
        sub = jax.tree_util.tree_map(lambda a: a[idx], batch)
        out = _run_chunk(model, sub, values[idx], seed + 7919 * c, settings)
        parts.append(tuple(o[:n_real] if isinstance(o, np.ndarray) else o for o in out))
    vals, div, nsteps, acc, pe, step = (np.concatenate([p[i] for p in parts]) for i in range(6))
    wall = sum(p[6] for p in parts)
    compile_time = sum(p[7] for p in parts)
    r_hat, ess = _diagnostics(model, vals, chains)
    return NutsResult(
        samples=vals, r_hat=r_hat, ess_bulk=ess, divergences=div.sum(axis=(1, 2)).astype(int),
        mean_tree_steps=nsteps.mean(axis=(1, 2)), step_size=step, accept_prob=acc.mean(axis=(1, 2)),
        potential=pe, diverging=div, num_steps=nsteps, likelihood=likelihood,
        free_keys=list(model.free_keys), keys=list(model.keys), wall_time=wall,
        compile_time=compile_time)


def _run_chunk(model, batch, values, seed, settings):
    likelihood, chains, draws, warmup, dense_mass, target_accept, max_tree_depth = settings
    n_gal = values.shape[0]
    names = _site_names(model)
    z0 = np.empty((n_gal, len(names)), np.float32)
    for j in range(n_gal):
        gal = jax.tree_util.tree_map(lambda a: a[j], batch)
        sites = model.site_values(jnp.asarray(values[j], jnp.float32), gal)
        z = unconstrain_fn(model.numpyro_model, (gal,), {"likelihood": "none"}, sites)
        z0[j] = [float(z[k]) for k in names]
    chol = _whitening(model, batch, values)
    keys = jax.random.split(jax.random.PRNGKey(seed), (n_gal, chains))
    _, prog, executables = _get_program(model, *settings)
    args = (jnp.asarray(z0), jnp.asarray(chol), jax.tree_util.tree_map(jnp.asarray, batch), keys)
    shape_key = tuple(np.shape(a) for a in jax.tree_util.tree_leaves(args))
    t0 = time.perf_counter()
    if shape_key not in executables:
        executables[shape_key] = prog.lower(*args).compile()
    compile_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(executables[shape_key](*args))
    wall = time.perf_counter() - t0
    vals, div, nsteps, acc, pe, step = (np.asarray(o) for o in out)
    return vals.astype(np.float64), div, nsteps, acc, pe, step, wall, compile_time


def _diagnostics(model, vals, chains):
    """Rank-normalised split R-hat and bulk ESS (ArviZ) per galaxy and free parameter."""
    import arviz as az

    free = np.asarray(model.free)
    n_gal = vals.shape[0]
    r_hat = np.full((n_gal, len(free)), np.nan)
    ess = np.full((n_gal, len(free)), np.nan)
    for j in range(n_gal):
        for s, i in enumerate(free):
            x = vals[j, :, :, i]    # angles sampled near the MAP inside their bounds: no wrapping
            if not np.all(np.isfinite(x)):
                continue
            if chains >= 2:
                r_hat[j, s] = float(az.rhat(x))
            ess[j, s] = float(az.ess(x, method="bulk"))
    return r_hat, ess


def pointwise_loglike(model: Model, gal: GalaxyArrays, samples, *, chunk: int = 128) -> np.ndarray:
    """Gaussian log-likelihood of every unmasked pixel at every draw, for PSIS-LOO
    (:func:`arviz.loo`, :mod:`galbayes.compare`): ``−½ ((D − M)/σ)² − ln(σ √(2π))``.

    ``gal`` is one galaxy's packed arrays, ``samples`` its ``(C, D, E)`` draws in user units
    (``NutsResult.samples[j]``). Returns ``(C, D, n_pix)`` float32, the unmasked pixels in
    row-major order. Draws are rendered ``chunk`` at a time (one compiled shape)."""
    samples = np.asarray(samples, np.float64)
    c, d, e = samples.shape
    flat = samples.reshape(c * d, e)
    def one(v, g):
        r = (g.image - model.render(v, g)) / g.sigma
        return -0.5 * r * r - jnp.log(g.sigma * jnp.sqrt(2.0 * jnp.pi))

    fn = compiled(model, ("nuts_loglike",), lambda: jax.jit(jax.vmap(one, in_axes=(0, None))))
    g = jax.tree_util.tree_map(jnp.asarray, gal)
    use = np.asarray(gal.weight).reshape(-1) > 0
    size = min(chunk, len(flat))
    out = np.empty((len(flat), int(use.sum())), np.float32)
    for start in range(0, len(flat), size):
        part = flat[start:start + size]
        n = len(part)
        if n < size:
            part = np.concatenate([part, np.repeat(part[-1:], size - n, axis=0)])
        ll = np.asarray(fn(jnp.asarray(part, jnp.float32), g)).reshape(size, -1)
        out[start:start + n] = ll[:n, use]
    return out.reshape(c, d, -1)


def to_inference_data(model: Model, result: NutsResult, j: int, *, galaxy_id=None, map_values=None,
                      log_likelihood=None):
    """ArviZ InferenceData of galaxy ``j``: free parameters in user units + sample stats;
    with ``log_likelihood`` (``(C, D, n_pix)``, :func:`pointwise_loglike`) a
    ``log_likelihood`` group (variable ``pixels``) for PSIS-LOO."""
    import arviz as az

    posterior = {k: result.samples[j, :, :, result.keys.index(k)] for k in result.free_keys}
    stats = {"lp": -result.potential[j], "diverging": result.diverging[j].astype(bool),
             "n_steps": result.num_steps[j]}
    attrs = {"likelihood": result.likelihood, "galaxy_id": str(galaxy_id if galaxy_id is not None else j),
             "sampler": "numpyro NUTS (vectorised over galaxies and chains)",
             "divergences": int(result.divergences[j])}
    fixed = [i for i in range(len(result.keys)) if result.keys[i] not in result.free_keys]
    for i in fixed:
        attrs[f"fixed_{result.keys[i]}"] = float(result.samples[j, 0, 0, i])
    if map_values is not None:
        for k, v in zip(result.keys, map_values):
            attrs[f"map_{k}"] = float(v)
    extra = {} if log_likelihood is None else {"log_likelihood": {"pixels": np.asarray(log_likelihood)}}
    idata = az.from_dict(posterior=posterior, sample_stats=stats, attrs=attrs, **extra)
    idata.posterior.attrs.update(attrs)     # also on the group (what most readers look at)
    return idata


def summary_rows(result: NutsResult, ids) -> list:
    """One dict per (galaxy, free parameter): id, param, mean, sd, r_hat, ess_bulk, divergences."""
    rows = []
    for j, gid in enumerate(ids):
        for key, s in result.summary(j).items():
            rows.append({"id": str(gid), "param": key, **s, "divergences": int(result.divergences[j])})
    return rows


def save_posteriors(model: Model, result: NutsResult, ids, out_dir, *, map_values=None,
                    batch: GalaxyArrays | None = None) -> list:
    """Write ``out_dir/<id>.nc`` (ArviZ netCDF) per galaxy; returns the paths. Given the
    galaxies' packed ``batch``, each file also gets the pointwise (per-pixel) Gaussian
    log-likelihoods of every draw (:func:`pointwise_loglike`; n_pix × chains × draws float32,
    e.g. 260 MB for a 128² stamp and 4 × 1000 draws), which PSIS-LOO needs."""
    from ..results import safe_name

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, gid in enumerate(ids):
        ll = None
        if batch is not None:
            ll = pointwise_loglike(model, jax.tree_util.tree_map(lambda a: np.asarray(a)[j], batch),
                                   result.samples[j])
        idata = to_inference_data(model, result, j, galaxy_id=gid,
                                  map_values=None if map_values is None else map_values[j], log_likelihood=ll)
        path = out_dir / f"{safe_name(gid)}.nc"
        idata.to_netcdf(str(path))
        paths.append(path)
    return paths


def __getattr__(name):
    # Deprecated location (one release): the results-folder driver is galbayes.sampling.
    if name == "sample_results":
        import warnings

        warnings.warn("galbayes.inference.nuts.sample_results moved to galbayes.sampling.sample_results",
                      DeprecationWarning, stacklevel=2)
        from ..sampling import sample_results

        return sample_results
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

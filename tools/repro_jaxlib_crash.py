"""Minimal programs that crashed jaxlib 0.10.x's CPU runtime (issue 15, docs/known-issues.md).

``reduce7d`` is the minimal reproducer (jax alone, no galbayes): the sum over one inner axis of
the product of two f32[4,1,3,3,4,16,8] arrays, which jaxlib 0.10.2 compiles to a YNNPACK
reduce fusion with the multiply fused in; on a CPU without AVX-512 it segfaults in
``slinky::internal::can_fuse`` (libjax_common.so). The other cases are the galbayes programs
in which it was found (they contain many such fusions):

* ``hessian``: ``jit(vmap(hessian(numpyro potential energy)))`` of a single Sérsic with the
  default pixel integration (sub-pixel box + central triangle fan), 48×48 stamp, 15×15 PSF;
* ``nuts``: numpyro NUTS (2 chains, vectorised) on the same model, a few hundred draws;
* ``fan``: the triangle-fan quadrature alone, its Jacobian and Hessian.

Run one case per process (a segfault kills the process): ``python tools/repro_jaxlib_crash.py
hessian``; the exit status is 0 when the program ran and its result is finite. The regression
test (tests/test_known_issues.py) runs every case in a subprocess.
"""
from __future__ import annotations

import sys

import numpy as np


def _model_and_batch(n_gal=3, size=48, psf_size=15, seed=11):
    import galbayes as gb

    model = gb.Model([gb.Component("sersic", "sersic", {"n": {"bounds": [0.3, 8.0]}})], likelihood="gaussian")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:psf_size, :psf_size] - (psf_size - 1) / 2.0
    psf = (1.0 + (xx**2 + yy**2) / 4.0) ** -3.5
    gals = []
    for i in range(n_gal):
        truth = {"sersic_xc": 23.3 + i * 0.3, "sersic_yc": 24.1 - i * 0.2, "sersic_pa": 30.0 + 10 * i,
                 "sersic_q": 0.6, "sersic_re": 4.0 + i, "sersic_n": 2.5, "sersic_mag": 18.0}
        obs = gb.Observation(image=np.zeros((size, size)), sigma=np.ones((size, size)), psf=psf)
        clean = gb.render_model(model, obs, truth)
        sigma = np.sqrt(0.01 + np.abs(clean) * 0.05)
        data = clean + rng.normal(size=clean.shape) * sigma
        obs = gb.Observation(image=data, sigma=sigma, psf=psf, id=f"g{i}")
        start = {k: v * (1.02 if k.endswith(("re", "n", "q")) else 1.0) for k, v in truth.items()}
        gals.append(model.pack(obs, start))
    return model, gb.Model.stack(gals)


def case_reduce7d():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=(4, 1, 3, 3, 4, 16, 8)), jnp.float32) for _ in range(2))
    out = jax.jit(lambda a, b: jnp.sum(a * b, axis=5))(a, b)
    got = np.asarray(jax.block_until_ready(out))
    ref = np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=5)
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5), "wrong sum"
    return got


def case_hessian():
    import jax
    import jax.numpy as jnp
    from numpyro.infer.util import potential_energy

    from galbayes.inference.laplace import _unconstrained

    model, batch = _model_and_batch()

    def one(v, gal):
        flat, unravel = _unconstrained(model, v, gal)
        return jax.hessian(lambda x: potential_energy(model.numpyro_model, (gal,), {"likelihood": "gaussian"},
                                                      unravel(x)))(flat)

    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    out = jax.jit(jax.vmap(one))(jnp.asarray(batch.values0), batch)
    return np.asarray(jax.block_until_ready(out))


def case_nuts():
    import jax
    import jax.numpy as jnp
    from numpyro.infer import MCMC, NUTS, init_to_value

    model, batch = _model_and_batch(n_gal=1)
    gal = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), batch)
    sites = model.site_values(gal.values0, gal)
    kernel = NUTS(model.numpyro_model, init_strategy=init_to_value(values=sites))
    mcmc = MCMC(kernel, num_warmup=100, num_samples=200, num_chains=2, chain_method="vectorized",
                progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), gal)
    samples = mcmc.get_samples()
    return np.asarray(jax.block_until_ready(samples["sersic_xc"]))


def case_fan():
    import jax
    import jax.numpy as jnp

    from galbayes.geometry import fan_block, pixel_grid
    from galbayes.profiles import get_profile

    prof = get_profile("sersic")
    grid = pixel_grid((32, 32))

    def total(theta):
        p = {"xc": theta[0], "yc": theta[1], "pa": theta[2], "q": theta[3], "re": theta[4], "n": theta[5],
             "mag": theta[6], "box": 0.0, "zp": 22.5}
        block, _, _ = fan_block(lambda g: prof.fn(p, g), grid, p["xc"], p["yc"], size=3, shape=(32, 32))
        return jnp.sum(block**2)

    theta = jnp.asarray([[15.3, 16.2, 30.0, 0.6, 3.0, 4.0, 18.0]] * 4, jnp.float32)
    out = jax.jit(jax.vmap(jax.hessian(total)))(theta)
    return np.asarray(jax.block_until_ready(out))


CASES = {"reduce7d": case_reduce7d, "hessian": case_hessian, "nuts": case_nuts, "fan": case_fan}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = argv or list(CASES)
    import jax
    import jaxlib

    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}", flush=True)
    ok = True
    for name in names:
        out = CASES[name]()
        finite = bool(np.all(np.isfinite(out)))
        print(f"{name}: ran, shape {out.shape}, finite={finite}", flush=True)
        ok &= finite
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

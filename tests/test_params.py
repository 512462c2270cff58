"""galbayes.params: the position-angle period and wrap_angle (numpy, jax, Python floats)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from galbayes.params import ANGLE_PERIOD, wrap_angle

RNG = np.random.default_rng(7)
ANGLES = np.concatenate([[-270.0, -180.0, -90.0, -89.999, -45.0, -0.0, 0.0, 45.0, 89.999, 90.0, 180.0,
                          270.0, 359.5, np.nan], RNG.uniform(-720.0, 720.0, 500)])


def _reference(x, mid=0.0):
    """The rule as the sites wrote it before (numpy)."""
    return mid + np.mod(x - mid + 90.0, 180.0) - 90.0


def test_period():
    assert ANGLE_PERIOD == 180.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_wrap_matches_the_old_expressions_bit_for_bit(dtype):
    x = ANGLES.astype(dtype)
    got = wrap_angle(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, (x + 90.0) % 180.0 - 90.0)       # model.wrap_angles
    np.testing.assert_array_equal(got, _reference(x))
    r = RNG.uniform(-90.0, 90.0, x.size).astype(dtype)                    # plot: r + wrap(f - r)
    np.testing.assert_array_equal(r + wrap_angle(x - r), r + ((x - r + 90.0) % 180.0 - 90.0))
    mid = RNG.uniform(-200.0, 200.0, x.size).astype(dtype)               # laplace, bootstrap, map
    np.testing.assert_array_equal(wrap_angle(x, mid), _reference(x, mid))
    np.testing.assert_array_equal(wrap_angle(x, mid), mid + ((x - mid) + 90.0) % 180.0 - 90.0)


def test_wrap_range_and_edges():
    ok = np.isfinite(ANGLES)
    w = wrap_angle(ANGLES)
    assert np.all((w[ok] >= -90.0) & (w[ok] < 90.0))
    assert np.isnan(w[~ok]).all()
    assert np.all(np.abs(np.round((w[ok] - ANGLES[ok]) / 180.0) * 180.0 - (w[ok] - ANGLES[ok])) < 1e-9)
    assert wrap_angle(90.0) == -90.0 and wrap_angle(-90.0) == -90.0       # [-90, 90): +90 → -90
    assert wrap_angle(-100.0) == 80.0 and wrap_angle(100.0) == -80.0
    assert wrap_angle(-0.0) == 0.0 and wrap_angle(180.0) == 0.0
    mid = 30.0
    assert wrap_angle(mid + 90.0, mid) == mid - 90.0 and wrap_angle(mid - 90.0, mid) == mid - 90.0
    assert wrap_angle(-200.0, mid) == -20.0
    wm = wrap_angle(ANGLES, mid)
    assert np.all((wm[ok] >= mid - 90.0) & (wm[ok] < mid + 90.0))


def test_python_floats_stay_floats():
    for x in (-270.0, -90.0, 0.0, 12.5, 90.0, 1e3):
        got = wrap_angle(x)
        assert type(got) is float and got == (x + 90.0) % 180.0 - 90.0
        assert wrap_angle(x - 90.0) == (x - 90.0 + 90.0) % 180.0 - 90.0    # initial.py, prepare.py


def test_jax_inputs_and_jit():
    x = ANGLES.astype(np.float32)
    mid = RNG.uniform(-200.0, 200.0, x.size).astype(np.float32)
    old = lambda a, m: m + jnp.mod(a - m + 90.0, 180.0) - 90.0             # noqa: E731  (map.py)
    got = jax.jit(wrap_angle)(jnp.asarray(x), jnp.asarray(mid))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(old)(jnp.asarray(x), jnp.asarray(mid))))
    np.testing.assert_array_equal(np.asarray(wrap_angle(jnp.asarray(x))), _reference(x))
    np.testing.assert_array_equal(np.asarray(got), _reference(x, mid))

"""galbayes.psf: zero-padded FFT convolution against scipy.signal.fftconvolve, alignment of
odd/even PSFs, no wrap-around, and PSF normalisation/validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

import galbayes as gb
from galbayes.psf import DECONV_MARGIN, canvas_margin, check_psf, convolve_fft, fft_shape, optical_kernel, psf_fft
from _helpers import render_single


def _convolve(image, psf):
    """galbayes' convolution of ``image`` with the unit-sum version of ``psf``."""
    psf_n = check_psf(psf)
    hat = psf_fft(psf_n, image.shape)
    return np.asarray(convolve_fft(jnp.asarray(image, jnp.float32), jnp.asarray(hat), psf_n.shape), np.float64)


def _reference(image, psf):
    return signal.fftconvolve(np.asarray(image, np.float64), psf / psf.sum(), mode="same")


CASES = [  # (image shape, PSF shape)
    ((64, 64), (41, 41)),   # odd PSF
    ((64, 64), (40, 40)),   # even PSF
    ((50, 37), (7, 12)),    # non-square image, non-square odd × even PSF
    ((31, 64), (14, 9)),    # even × odd
    ((24, 24), (41, 41)),   # PSF larger than the image
    ((24, 30), (40, 43)),
]


@pytest.mark.parametrize("image_shape, psf_shape", CASES)
def test_matches_scipy_fftconvolve_same(image_shape, psf_shape):
    rng = np.random.default_rng(hash((image_shape, psf_shape)) % 2**32)
    image = rng.normal(size=image_shape)
    psf = rng.random(psf_shape) + 0.05
    out, ref = _convolve(image, psf), _reference(image, psf)
    assert out.shape == image_shape
    # float32 FFTs: errors ~1e-7 of the largest value
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("psf_shape", [(41, 41), (40, 40), (9, 14), (12, 7)])
@pytest.mark.parametrize("i0, j0", [(20, 25), (0, 0), (43, 50), (3, 49)])
def test_delta_returns_the_psf_at_its_reference_pixel(psf_shape, i0, j0):
    """A one-pixel source at (i0, j0) gives the PSF with its pixel ((ky-1)//2, (kx-1)//2)
    on (i0, j0), cut at the image edges, and nothing else."""
    shape = (44, 51)
    rng = np.random.default_rng(7)
    psf = rng.random(psf_shape) + 0.1
    psf_n = psf / psf.sum()
    image = np.zeros(shape)
    image[i0, j0] = 1.0
    out = _convolve(image, psf)
    expected = np.zeros(shape)
    ky, kx = psf_shape
    cy, cx = (ky - 1) // 2, (kx - 1) // 2
    for a in range(ky):
        for b in range(kx):
            i, j = i0 + a - cy, j0 + b - cx
            if 0 <= i < shape[0] and 0 <= j < shape[1]:
                expected[i, j] = psf_n[a, b]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6 * psf_n.max())
    assert out[i0, j0] == pytest.approx(psf_n[cy, cx], rel=1e-4)


def test_no_wrap_around():
    """Bright sources on the left and top edges leave the opposite corner empty."""
    shape = (48, 48)
    y, x = np.mgrid[:41, :41]
    psf = np.exp(-0.5 * ((x - 20) ** 2 + (y - 20) ** 2) / 6.0**2)  # wide: 41×41, σ = 6
    image = np.zeros(shape)
    image[24, 0] = 1e4   # left edge: lights columns 0..20
    image[0, 30] = 1e4   # top edge: lights rows 0..20
    out = _convolve(image, psf)
    peak = out.max()
    assert np.abs(out[21:, 21:]).max() <= 1e-6 * peak
    np.testing.assert_allclose(out, _reference(image, psf), rtol=0, atol=1e-6 * peak)
    # the check is sharp: a circular (unpadded) convolution wraps light into that corner
    kernel = np.roll(np.pad(psf / psf.sum(), ((0, 7), (0, 7))), (-20, -20), axis=(0, 1))
    circ = np.real(np.fft.ifft2(np.fft.fft2(image) * np.fft.fft2(kernel)))
    assert np.abs(circ[21:, 21:]).max() > 1e-2 * peak


def test_fft_shape_is_even_and_large_enough():
    for image_shape, psf_shape in CASES + [((1, 1), (1, 1)), ((127, 33), (43, 5))]:
        shp = fft_shape(image_shape, psf_shape)
        for m, n, k in zip(shp, image_shape, psf_shape):
            assert m >= n + k - 1 and m % 2 == 0


def test_convolution_is_batched_over_leading_axes():
    rng = np.random.default_rng(11)
    images = rng.normal(size=(3, 20, 26)).astype(np.float32)
    psf = check_psf(rng.random((9, 8)) + 0.1)
    hat = jnp.asarray(psf_fft(psf, (20, 26)))
    batched = np.asarray(jax.vmap(lambda im: convolve_fft(im, hat, psf.shape))(jnp.asarray(images)))
    leading = np.asarray(convolve_fft(jnp.asarray(images), hat, psf.shape))
    for k in range(3):
        ref = _reference(images[k], psf)
        np.testing.assert_allclose(batched[k], ref, rtol=0, atol=2e-6 * np.abs(ref).max())
        np.testing.assert_allclose(leading[k], ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_observation_normalises_the_psf():
    rng = np.random.default_rng(5)
    psf = 37.0 * rng.random((13, 10))
    obs = gb.Observation(image=np.zeros((20, 20)), sigma=np.ones((20, 20)), psf=psf)
    assert obs.psf.shape == (13, 10)
    assert obs.psf.dtype == np.float32
    assert float(obs.psf.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(obs.psf, psf / psf.sum(), rtol=1e-6)


def _sersic_model(core=True, psf_type=None):
    comp = gb.Component("s", "sersic", {"xc": 16.3, "yc": 15.6, "pa": 20.0, "q": 0.6, "re": 3.0, "n": 2.5,
                                         "mag": gb.Param(init=18.0, bounds=(10.0, 30.0))})
    return gb.Model([comp], core=core, psf_type=psf_type)


def _render(model, shape, psf, values, psf_type=None):
    obs = gb.Observation(image=np.zeros(shape), sigma=np.ones(shape), psf=psf, psf_type=psf_type)
    return np.asarray(gb.render_model(model, obs, values), np.float64)


def _odd_psf(shape=(11, 12), seed=2):
    rng = np.random.default_rng(seed)
    psf = np.exp(-0.5 * ((np.arange(shape[1])[None, :] - 5.5) ** 2 + (np.arange(shape[0])[:, None] - 5) ** 2) / 2.0**2)
    return psf * (1.0 + 0.2 * rng.random(psf.shape))


@pytest.mark.parametrize("psf_type", ["optical", "effective"])
def test_model_image_is_the_kernel_convolved_profile_on_a_padded_canvas(psf_type):
    """render = crop(fftconvolve(pixel-integrated profile on the stamp + PSF half-size margin,
    kernel)), kernel = the PSF (optical) or the PSF with the pixel response divided out
    (effective); light from beyond the stamp edge is scattered in."""
    shape = (32, 36)
    psf = _odd_psf()
    model = _sersic_model(core=False)
    my, mx = canvas_margin(psf.shape)
    # the galaxy sits near the left edge: much of its light is outside the stamp
    values = {"s_xc": 2.3, "s_yc": 15.6}
    raw_big = _render(model, (shape[0] + 2 * my, shape[1] + 2 * mx), np.ones((1, 1)),
                      {"s_xc": 2.3 + mx, "s_yc": 15.6 + my}, "optical")
    kernel = optical_kernel(check_psf(psf), psf_type)
    ref = signal.fftconvolve(raw_big, kernel, mode="same")[my:my + shape[0], mx:mx + shape[1]]
    out = _render(model, shape, psf, values, psf_type)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-6 * ref.max())
    # without the margin the left columns would miss the light from x < -0.5
    inside = signal.fftconvolve(raw_big[my:my + shape[0], mx:mx + shape[1]], kernel, mode="same")
    assert np.abs(inside - ref)[:, :3].max() > 0.05 * ref.max()


def test_effective_kernel_times_pixel_response_is_the_psf():
    psf = check_psf(_odd_psf((13, 10), seed=4))
    kernel = optical_kernel(psf, "effective")
    m = DECONV_MARGIN
    assert kernel.shape == (13 + 2 * m, 10 + 2 * m)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    ky = np.fft.fftfreq(kernel.shape[0])[:, None]
    kx = np.fft.rfftfreq(kernel.shape[1])[None, :]
    back = np.fft.irfft2(np.fft.rfft2(kernel) * np.sinc(ky) * np.sinc(kx), s=kernel.shape)
    np.testing.assert_allclose(back, np.pad(psf, m), atol=1e-7)
    # optical: the PSF as given; a one-pixel PSF means no PSF for either kind
    np.testing.assert_array_equal(optical_kernel(psf, "optical"), np.pad(psf, m))
    np.testing.assert_array_equal(optical_kernel(np.ones((1, 1)), "effective"), np.pad(np.ones((1, 1)), m))


def test_effective_psf_model_matches_optical_psf_model():
    """The same Moffat drawn with the pixel (effective) and at pixel centres (optical) gives
    the same model (to the pixel deconvolution's accuracy)."""
    galsim = pytest.importorskip("galsim")
    from galbayes.mocks import moffat_psf

    model = _sersic_model()
    eff = _render(model, (32, 36), moffat_psf(25, fwhm=3.0, psf_type="effective"), None, "effective")
    opt = _render(model, (32, 36), moffat_psf(25, fwhm=3.0, psf_type="optical"), None, "optical")
    np.testing.assert_allclose(eff, opt, rtol=0, atol=5e-4 * opt.max())   # measured 2.0e-4
    # and treating the effective PSF as optical applies the pixel twice: visibly broader
    twice = _render(model, (32, 36), moffat_psf(25, fwhm=3.0, psf_type="effective"), None, "optical")
    assert twice.max() < opt.max() * 0.99
    del galsim


def test_bucket_padding_leaves_the_stamp_model_unchanged():
    """A stamp zero-padded at the end of each axis (zero weight) renders the same pixels."""
    psf = _odd_psf()
    model = _sersic_model()
    values = {"s_xc": 30.2, "s_yc": 3.4}
    small = _render(model, (32, 36), psf, values)
    big = _render(model, (48, 64), psf, values)[:32, :36]
    np.testing.assert_allclose(big, small, rtol=0, atol=2e-6 * small.max())


@pytest.mark.parametrize("bad", ["pixel", "", 3, "Effective_"])
def test_unknown_psf_type_is_an_error_naming_the_galaxy(bad):
    with pytest.raises(gb.InputError, match="g42.*psf_type|psf_type.*g42"):
        gb.Observation(image=np.zeros((8, 8)), sigma=np.ones((8, 8)), psf=np.ones((3, 3)), id="g42", psf_type=bad)
    with pytest.raises(gb.ModelError, match="unknown PSF type"):
        _sersic_model(psf_type=bad)


def test_psf_type_precedence_observation_over_model_over_default():
    psf = _odd_psf()
    obs = lambda kind: gb.Observation(image=np.zeros((20, 20)), sigma=np.ones((20, 20)), psf=psf, psf_type=kind)  # noqa: E731
    assert _sersic_model().psf_type_of(obs(None)) == "effective"
    assert _sersic_model(psf_type="optical").psf_type_of(obs(None)) == "optical"
    assert _sersic_model(psf_type="optical").psf_type_of(obs("EFFECTIVE")) == "effective"


def test_undersampled_effective_psf_warns():
    y, x = np.mgrid[:9, :9]
    narrow = np.exp(-0.5 * ((x - 4) ** 2 + (y - 4) ** 2) / 0.45**2)   # FWHM ≈ 1.06 px
    obs = gb.Observation(image=np.zeros((20, 20)), sigma=np.ones((20, 20)), psf=narrow, id="tiny")
    with pytest.warns(UserWarning, match="undersampled"):
        _sersic_model().pack(obs)
    obs_opt = gb.Observation(image=np.zeros((20, 20)), sigma=np.ones((20, 20)), psf=narrow, psf_type="optical")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _sersic_model().pack(obs_opt)


def test_recipe_psf_type_key_and_override():
    from galbayes.recipe import recipe_from_dict

    cfg = {"psf_type": "optical", "components": {"s": {"profile": "sersic"}}}
    assert recipe_from_dict(cfg).psf_type == "optical"
    assert recipe_from_dict(cfg, psf_type="effective").psf_type == "effective"
    assert recipe_from_dict({"components": {"s": {"profile": "sersic"}}}).psf_type is None
    with pytest.raises(gb.ModelError, match="unknown PSF type"):
        recipe_from_dict(dict(cfg, psf_type="pixelated"))

"""Figures in the style of the GALMOSS paper, with matplotlib only.

* :func:`fit_figure` — one fit (paper Fig. 2; Fig. B.6 with components): model, component
  images, data, normalised residuals, residual histogram, and the elliptical-annulus surface
  brightness profile of data, model and components with the residual profile below.
* :func:`fit_output_figure` — :func:`fit_figure` of one galaxy of a
  :func:`galbayes.pipeline.fit` result (renders the model and components).
* :func:`save_fit_figures` — :func:`fit_figure` for every galaxy of a catalog run
  (``results.fits`` + ``blocks/<id>.fits``), written to ``figures/<id>.png``.
* :func:`comparison_figure` — fitted vs reference values with R² (Fig. 3).
* :func:`error_comparison_figure` — covariance vs bootstrap error bars (Fig. 4).
* :func:`scene_preview` — a model image before and after PSF convolution (Fig. C.7).
* :func:`corner_with_laplace` — a corner plot of posterior samples with the Laplace
  (Gaussian) 1σ/2σ ellipses over it.

Every function builds a :class:`matplotlib.figure.Figure` directly (no ``pyplot`` state, so
it works with any backend, including Agg on a headless machine, and figures made in loops
are freed when dropped) and returns it. In a notebook, a returned figure is displayed when it
is the cell's last expression once the inline backend is active (``%matplotlib inline``). Images are shown with ``origin="lower"``: row 0 (y = 0) at
the bottom, x to the right, the convention of :mod:`galbayes.geometry`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse

from .errors import InputError, OptionsError
from .params import wrap_angle

__all__ = ["fit_figure", "fit_output_figure", "save_fit_figures", "comparison_figure", "error_comparison_figure",
           "scene_preview", "scene_images", "corner_with_laplace", "elliptical_profile",
           "model_geometry", "read_block", "r_squared"]

_STANDARD_HDUS = ("PRIMARY", "DATA", "MODEL", "RESIDUAL", "MASK", "SIGMA")
_COMP_STYLES = [("tab:red", "--"), ("tab:blue", ":"), ("tab:green", "-."), ("tab:purple", (0, (5, 1, 1, 1))),
                ("tab:brown", (0, (3, 1))), ("tab:pink", (0, (1, 1))), ("tab:olive", "--"), ("tab:cyan", ":")]


# --------------------------------------------------------------------------- helpers
def _ellipse_radius(shape, xc, yc, pa, q):
    """Elliptical radius along the major axis at every pixel centre (galbayes geometry)."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    theta = np.deg2rad(pa + 90.0)
    dx, dy = x - xc, y - yc
    xm = dx * np.cos(theta) + dy * np.sin(theta)
    ym = (-dx * np.sin(theta) + dy * np.cos(theta)) / max(q, 1e-3)
    return np.hypot(xm, ym)


def _radial_edges(r_max, n_bins):
    """Annulus edges up to ``r_max``: 1 pixel apart near the centre, log-spaced outside."""
    r_max = max(float(r_max), 2.0)
    ratio = (r_max / 0.75) ** (1.0 / max(int(n_bins), 2))
    edges = [0.0, 0.75]
    while edges[-1] < r_max:
        edges.append(max(edges[-1] + 1.0, edges[-1] * ratio))
    edges[-1] = r_max
    if edges[-1] - edges[-2] < 0.5:
        del edges[-2]
    return np.asarray(edges)


def elliptical_profile(image, xc, yc, pa, q, *, weight=None, sigma=None, edges=None,
                       r_max=None, n_bins=24):
    """Means of ``image`` in elliptical annuli (pixels with weight > 0 only).

    Parameters
    ----------
    image : 2-D array
    xc, yc, pa, q : float
        Centre (0-based pixels), position angle (deg CCW from +y) and axis ratio of the
        annuli; the radius is measured along the major axis.
    weight : 2-D array, optional
        Ω (1 = use the pixel); default all pixels.
    sigma : 2-D array, optional
        Per-pixel 1σ; gives the uncertainty of each annulus mean, √Σσ² / N.
    edges : array, optional
        Annulus edges in pixels; default ``n_bins`` log-spaced edges up to ``r_max``
        (default: half the smaller image side).

    Returns
    -------
    dict with ``r`` (mean radius of the pixels in each annulus), ``mean``, ``err`` (NaN
    without ``sigma``), ``n`` (pixels per annulus) and ``edges``; empty annuli are dropped.
    """
    image = np.asarray(image, np.float64)
    w = np.ones(image.shape) if weight is None else np.asarray(weight, np.float64)
    if edges is None:
        edges = _radial_edges(r_max if r_max is not None else 0.5 * min(image.shape), n_bins)
    edges = np.asarray(edges, np.float64)
    r = _ellipse_radius(image.shape, xc, yc, pa, q)
    use = (w > 0) & np.isfinite(image) & (r < edges[-1])
    idx = np.digitize(r[use], edges) - 1
    nb = len(edges) - 1
    n = np.bincount(idx, minlength=nb)[:nb].astype(np.float64)
    s = np.bincount(idx, weights=image[use], minlength=nb)[:nb]
    rs = np.bincount(idx, weights=r[use], minlength=nb)[:nb]
    if sigma is not None:
        var = np.bincount(idx, weights=np.asarray(sigma, np.float64)[use] ** 2, minlength=nb)[:nb]
    keep = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"r": (rs / n)[keep], "mean": (s / n)[keep], "n": n[keep], "edges": edges}
        out["err"] = (np.sqrt(var) / n)[keep] if sigma is not None else np.full(int(keep.sum()), np.nan)
    return out


def _asinh_norm(data, weight, sigma, model=None):
    """An asinh stretch: linear within ~2σ of zero, logarithmic above; vmax = the peak."""
    use = weight > 0
    vals = data[use & np.isfinite(data)]
    noise = float(np.median(sigma[use])) if sigma is not None and use.any() else float(np.std(vals) or 1.0)
    noise = noise if noise > 0 else 1.0
    vmax = float(np.percentile(vals, 99.95)) if vals.size else 1.0
    if model is not None and np.isfinite(model).any():
        vmax = max(vmax, float(np.nanmax(model)))
    vmax = max(vmax, 10 * noise)
    return mcolors.AsinhNorm(linear_width=2.0 * noise, vmin=-3.0 * noise, vmax=vmax)


def _cmap(name, bad="0.75"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _image_axis(ax, img, norm, cmap, title, *, mask=None):
    shown = np.ma.masked_where(mask, img) if mask is not None else img
    im = ax.imshow(shown, origin="lower", norm=norm, cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def read_block(path) -> dict:
    """Read a ``blocks/<id>.fits`` file: data, model, sigma, weight, components, header."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        names = [h.name.upper() for h in hdul]
        for need in ("DATA", "MODEL", "SIGMA"):
            if need not in names:
                raise InputError(f"{path}: not a galbayes image block (no {need} HDU; has {names})")
        get = lambda n: np.asarray(hdul[n].data, np.float64)  # noqa: E731
        mask = np.asarray(hdul["MASK"].data) if "MASK" in names else np.zeros(hdul["DATA"].data.shape)
        comps = {h.name.lower(): np.asarray(h.data, np.float64) for h in hdul
                 if h.name.upper() not in _STANDARD_HDUS and h.data is not None}
        return {"data": get("DATA"), "model": get("MODEL"), "sigma": get("SIGMA"),
                "weight": (mask == 0).astype(np.float64), "components": comps,
                "header": dict(hdul[0].header)}


def _header_geometry(header: dict, components) -> dict | None:
    """Centre/pa/q of the brightest component whose parameters are in a block's header."""
    hdr = {str(k).upper(): v for k, v in header.items()}

    def num(key):
        v = hdr.get(key)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None

    best, centre = None, None
    for c in components:
        c = c.upper()
        xc, yc = num(f"{c}_XC"), num(f"{c}_YC")
        if centre is None and xc is not None and yc is not None:
            centre = (xc, yc)
        pa, q, mag = num(f"{c}_PA"), num(f"{c}_Q"), num(f"{c}_MAG")
        if pa is not None and q is not None:
            cand = (mag if mag is not None else math.inf, c, pa, q, (xc, yc) if xc is not None else None)
            if best is None or cand[0] < best[0]:
                best = cand
    if centre is None:
        return None
    geom = {"xc": centre[0], "yc": centre[1], "pa": 0.0, "q": 1.0}
    if best is not None:
        geom.update(pa=best[2], q=best[3])
        if best[4] is not None and best[4][1] is not None:
            geom.update(xc=best[4][0], yc=best[4][1])
    return geom


def _moment_geometry(data, weight):
    d = np.where(weight > 0, np.clip(data, 0, None), 0.0)
    tot = d.sum()
    ny, nx = d.shape
    if not tot > 0:
        return {"xc": (nx - 1) / 2, "yc": (ny - 1) / 2, "pa": 0.0, "q": 1.0}
    y, x = np.mgrid[0:ny, 0:nx]
    return {"xc": float((d * x).sum() / tot), "yc": float((d * y).sum() / tot), "pa": 0.0, "q": 1.0}


def model_geometry(model, values) -> dict:
    """Centre, pa and q defining the profile axis, from a fitted model's values.

    ``values``: dict keyed ``<component>_<param>`` (e.g. a results-table row) or the entry
    vector. The brightest component with ``pa`` and ``q`` sets the axis (its centre, or the
    first centred component's); without any, ``q = 1``.
    """
    if not isinstance(values, dict):
        values = dict(zip(model.keys, np.asarray(values, np.float64)))

    def val(comp, name):
        if (comp, name) not in model.slots:
            return None
        key = model.entries[model.slots[(comp, name)]].key
        v = values.get(key)
        return None if v is None or not np.isfinite(float(v)) else float(v)

    centre, best = None, None
    for c in model.components:
        xc, yc = val(c.name, "xc"), val(c.name, "yc")
        if xc is None or yc is None:
            continue
        if centre is None:
            centre = (xc, yc)
        pa, q, mag = val(c.name, "pa"), val(c.name, "q"), val(c.name, "mag")
        if pa is not None and q is not None:
            mag = math.inf if mag is None else mag
            if best is None or mag < best[0]:
                best = (mag, xc, yc, pa, q)
    if best is not None:
        return {"xc": best[1], "yc": best[2], "pa": best[3], "q": best[4]}
    if centre is not None:
        return {"xc": centre[0], "yc": centre[1], "pa": 0.0, "q": 1.0}
    return {}


# --------------------------------------------------------------------------- Fig. 2 / B.6
def fit_figure(block=None, *, data=None, model=None, sigma=None, weight=None, components=None,
               xc=None, yc=None, pa=None, q=None, geometry=None, title=None, r_max=None,
               n_bins=24, max_component_images=6, pixel_scale=None):
    """One fit in the layout of the paper's Fig. 2 (Fig. B.6 when there are components).

    Left: model, component images (when there are ≥ 2), data, residual (D − M)/σ and the
    histogram of the normalised residuals of unmasked pixels with N(0, 1) over it. Right:
    means in elliptical annuli (centre, pa and q of the main component; radius along the
    major axis) of the data (with the uncertainty of the mean), the model (black) and each
    component, and below the residual D − M per annulus.

    Parameters
    ----------
    block : str or Path, optional
        A ``blocks/<id>.fits`` file from :func:`galbayes.pipeline.fit_catalog`; otherwise give
        the arrays.
    data, model, sigma : 2-D arrays
    weight : 2-D array, optional
        Ω (1 = fitted pixel); default all ones.
    components : dict, optional
        Component name → its model image.
    xc, yc, pa, q : float, optional
        Axis of the radial profile; or ``geometry`` = dict with those keys. For a block, the
        default comes from its header (brightest component), else from image moments.
    r_max, n_bins : float, int
        Outer radius (pixels, default half the smaller image side) and number of annuli.
    pixel_scale : float, optional
        Arcsec per pixel: adds an arcsec axis on top of the profile.

    Returns
    -------
    matplotlib.figure.Figure
    """
    header = {}
    if block is not None:
        blk = read_block(block)
        data = blk["data"] if data is None else data
        model = blk["model"] if model is None else model
        sigma = blk["sigma"] if sigma is None else sigma
        weight = blk["weight"] if weight is None else weight
        components = blk["components"] if components is None else components
        header = blk["header"]
        if title is None:
            gid = header.get("ID", Path(block).stem)
            chi = header.get("CHI2_RED")
            title = f"{gid}" + (f"   χ²_red = {float(chi):.3f}" if isinstance(chi, (int, float)) else "")
    if data is None or model is None:
        raise OptionsError("give a block file or the data and model arrays")
    data = np.asarray(data, np.float64)
    model = np.asarray(model, np.float64)
    if data.shape != model.shape:
        raise OptionsError(f"data {data.shape} and model {model.shape} differ in shape")
    sigma = np.ones_like(data) if sigma is None else np.asarray(sigma, np.float64)
    weight = np.ones_like(data) if weight is None else np.asarray(weight, np.float64)
    components = dict(components or {})

    geom = dict(geometry or {})
    for k, v in (("xc", xc), ("yc", yc), ("pa", pa), ("q", q)):
        if v is not None:
            geom[k] = float(v)
    if not {"xc", "yc"} <= set(geom):
        base = _header_geometry(header, list(components)) if header else None
        base = base or _moment_geometry(data, weight)
        geom = {**base, **geom}
    geom.setdefault("pa", 0.0)
    geom.setdefault("q", 1.0)

    mask = weight <= 0
    safe_sigma = np.where(sigma > 0, sigma, np.inf)
    resid_n = np.where(mask, np.nan, (data - model) / safe_sigma)

    show_comps = list(components.items())[:max_component_images] if len(components) >= 2 else []
    panels = [("model", "Model")] + [("comp", n) for n, _ in show_comps] + [("data", "Data"),
                                                                           ("resid", "Residual (D − M)/σ"),
                                                                           ("hist", "Residual distribution")]
    n_pan = len(panels)
    ncols = 2 if n_pan <= 4 else (3 if n_pan <= 9 else 4)
    nrows = math.ceil(n_pan / ncols)

    fig = Figure(figsize=(2.3 * ncols + 5.2, max(2.35 * nrows, 4.4) + (0.35 if title else 0.0)),
                 layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[2.3 * ncols, 5.0])
    left = outer[0].subgridspec(nrows, ncols)
    right = outer[1].subgridspec(2, 1, height_ratios=[3, 1.3], hspace=0.0)

    norm = _asinh_norm(data, weight, sigma, model)
    img_cmap = _cmap("magma")
    res_cmap = _cmap("RdBu_r")
    axes_img = []
    for i, (kind, label) in enumerate(panels):
        ax = fig.add_subplot(left[i // ncols, i % ncols])
        if kind == "model":
            _image_axis(ax, model, norm, img_cmap, label)
        elif kind == "comp":
            _image_axis(ax, components[label], norm, img_cmap, label)
        elif kind == "data":
            _image_axis(ax, data, norm, img_cmap, label + " (masked: grey)" if mask.any() else label, mask=mask)
        elif kind == "resid":
            _image_axis(ax, resid_n, mcolors.Normalize(-5, 5), res_cmap, label)
        else:
            vals = resid_n[np.isfinite(resid_n)]
            bins = np.linspace(-6, 6, 61)
            ax.hist(np.clip(vals, -6, 6), bins=bins, density=True, color="tab:blue", alpha=0.7)
            g = np.linspace(-6, 6, 200)
            ax.plot(g, np.exp(-0.5 * g**2) / math.sqrt(2 * math.pi), color="k", lw=1, label="N(0, 1)")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("(D − M)/σ", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_yticks([])
            if vals.size:
                ax.text(0.03, 0.95, f"mean {np.mean(vals):+.2f}\nstd {np.std(vals):.2f}",
                        transform=ax.transAxes, va="top", fontsize=7)
            ax.legend(fontsize=6, loc="upper right", frameon=False)
        axes_img.append(ax)
    # the profile axis, drawn over the model and data panels
    r_lim = r_max if r_max is not None else 0.5 * min(data.shape)
    for ax, (kind, _) in zip(axes_img, panels):
        if kind in ("model", "data", "resid"):
            t = math.radians(geom["pa"] + 90.0)
            dx, dy = r_lim * math.cos(t), r_lim * math.sin(t)
            ax.plot([geom["xc"] - dx, geom["xc"] + dx], [geom["yc"] - dy, geom["yc"] + dy],
                    color="w" if kind != "resid" else "k", lw=0.6, alpha=0.6)
            ax.set_xlim(-0.5, data.shape[1] - 0.5)
            ax.set_ylim(-0.5, data.shape[0] - 0.5)

    # right: radial profile
    ax_p = fig.add_subplot(right[0])
    ax_r = fig.add_subplot(right[1], sharex=ax_p)
    edges = _radial_edges(r_lim, n_bins)
    kw = dict(weight=weight, edges=edges)
    g4 = (geom["xc"], geom["yc"], geom["pa"], geom["q"])
    pd = elliptical_profile(data, *g4, sigma=sigma, **kw)
    pm = elliptical_profile(model, *g4, **kw)
    pr = elliptical_profile(data - model, *g4, sigma=sigma, **kw)
    pos = pd["mean"] > 0
    ax_p.errorbar(pd["r"][pos], pd["mean"][pos], yerr=pd["err"][pos], fmt="o", ms=3.5, color="tab:orange",
                  ecolor="tab:orange", elinewidth=1, capsize=1.5, label="data", zorder=3)
    ax_p.plot(pm["r"], np.where(pm["mean"] > 0, pm["mean"], np.nan), color="k", lw=1.4, label="model", zorder=4)
    for i, (name, img) in enumerate(components.items() if len(components) >= 2 else ()):
        pc = elliptical_profile(np.asarray(img, np.float64), *g4, **kw)
        colour, ls = _COMP_STYLES[i % len(_COMP_STYLES)]
        ax_p.plot(pc["r"], np.where(pc["mean"] > 0, pc["mean"], np.nan), color=colour, ls=ls, lw=1.3,
                  label=name, zorder=4)
    ax_p.set_yscale("log")
    positive = np.concatenate([pd["mean"][pos], pm["mean"][pm["mean"] > 0]])
    if positive.size:
        top = np.max(positive)
        bottom = pd["mean"][pos].min() if pos.any() else positive.min()
        ax_p.set_ylim(max(bottom * 0.3, top * 1e-5), top * 2.0)
    ax_p.set_ylabel("mean surface brightness [image units / pix]", fontsize=8)
    ax_p.legend(fontsize=7, frameon=False, loc="upper right")
    ax_p.tick_params(labelsize=7, labelbottom=False)
    ax_p.set_title(f"elliptical annuli: centre ({geom['xc']:.1f}, {geom['yc']:.1f}), "
                   f"pa {geom['pa']:.0f}°, q {geom['q']:.2f}", fontsize=8)
    ax_r.axhline(0.0, color="k", lw=0.8)
    ax_r.errorbar(pr["r"], pr["mean"], yerr=pr["err"], fmt="o", ms=3, color="tab:blue", elinewidth=1,
                  capsize=1.5)
    ax_r.set_xlabel("radius along the major axis [pix]", fontsize=8)
    ax_r.set_ylabel("D − M", fontsize=8)
    ax_r.tick_params(labelsize=7)
    if pixel_scale:
        sec = ax_p.secondary_xaxis("top", functions=(lambda r: r * pixel_scale, lambda a: a / pixel_scale))
        sec.set_xlabel("arcsec", fontsize=7)
        sec.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fit_output_figure(fit_output, galaxy_id, values=None, **kwargs):
    """:func:`fit_figure` of one galaxy of a :func:`galbayes.pipeline.fit` result.

    Renders the model and component images at the fitted values (or at ``values``, an
    entry vector) and takes the profile axis from the brightest component; keyword
    arguments go to :func:`fit_figure`.
    """
    from .model import Model
    from .fitting import render_batch

    model = fit_output.model
    gid = str(galaxy_id)
    gal = fit_output.galaxies[gid]
    vals = np.asarray(fit_output.values[gid] if values is None else values, np.float64)
    images, comps = render_batch(model, Model.stack([gal]), np.nan_to_num(vals)[None])
    kwargs.setdefault("geometry", model_geometry(model, vals) or None)
    if "title" not in kwargs:
        title = gid
        try:
            title += f"   χ²_red = {float(fit_output.row(gid)['chi2_red']):.3f}"
        except (KeyError, ValueError, TypeError):
            pass
        kwargs["title"] = title
    comps = {c.name: np.asarray(comps[c.name][0]) for c in model.components if c.name in comps}
    return fit_figure(data=np.asarray(gal.image), model=np.asarray(images[0]), sigma=np.asarray(gal.sigma),
                      weight=np.asarray(gal.weight), components=comps, **kwargs)


def save_fit_figures(model, out_dir, *, fmt: str = "png", dpi: int = 110, ids=None) -> list:
    """Write one :func:`fit_figure` per fitted galaxy of a catalog run.

    Reads ``out_dir/results.fits`` and ``out_dir/blocks/<id>.fits`` (as written by
    :func:`galbayes.pipeline.fit_catalog`) and writes ``out_dir/figures/<id>.<fmt>``; the
    profile axis comes from the fitted parameters of ``model``'s brightest component.
    Every galaxy whose fit is usable (:func:`galbayes.status.is_usable`: status ``ok``,
    ``ok; errors: ...`` or ``ok; <input note>`` — the galaxies ``galbayes sample`` and
    ``galbayes compare`` use) gets a figure; failed galaxies and galaxies without a block are
    skipped. Returns the paths written.
    """
    from astropy.table import Table

    from .results import safe_name
    from .status import is_usable

    out_dir = Path(out_dir)
    table = Table.read(out_dir / "results.fits")
    fig_dir = out_dir / "figures"
    written = []
    for row in table:
        gid = str(row["id"])
        if ids is not None and gid not in ids:
            continue
        if "status" in table.colnames and not is_usable(row["status"]):
            continue
        block = out_dir / "blocks" / f"{safe_name(gid)}.fits"
        if not block.exists():
            continue
        values = {k: float(row[k]) for k in model.keys if k in table.colnames}
        title = gid
        if "chi2_red" in table.colnames:
            title += f"   χ²_red = {float(row['chi2_red']):.3f}"
        blk = read_block(block)
        # the model's component order (block HDUs may be in another order)
        order = [c.name.lower() for c in model.components]
        comps = {n: blk["components"][n] for n in order if n in blk["components"]}
        comps.update({n: v for n, v in blk["components"].items() if n not in comps})
        fig = fit_figure(data=blk["data"], model=blk["model"], sigma=blk["sigma"], weight=blk["weight"],
                         components=comps, geometry=model_geometry(model, values) or None, title=title)
        fig_dir.mkdir(parents=True, exist_ok=True)
        path = fig_dir / f"{safe_name(gid)}.{fmt}"
        fig.savefig(path, dpi=dpi)
        written.append(path)
    return written


# --------------------------------------------------------------------------- Fig. 3
def r_squared(fitted, reference) -> float:
    """Coefficient of determination of ``fitted`` as a prediction of ``reference``:
    ``1 − Σ(f − r)² / Σ(r − r̄)²`` (1 = on the identity line)."""
    f = np.asarray(fitted, np.float64)
    r = np.asarray(reference, np.float64)
    ok = np.isfinite(f) & np.isfinite(r)
    f, r = f[ok], r[ok]
    ss_tot = np.sum((r - r.mean()) ** 2) if r.size else 0.0
    if ss_tot <= 0:
        return float("nan")
    return float(1.0 - np.sum((f - r) ** 2) / ss_tot)


def _is_angle(name, model=None):
    """Whether the column ``name`` holds a position angle, as its parameter declaration says
    (``ParamSpec.angle``, the flag :meth:`~galbayes.model.Model.wrap_angles` uses): with a
    model, ``name`` is one of its angle entries; without, it is the name of an angle parameter
    of a registered profile, bare or as ``<component>_<name>`` (``pa``, ``sersic_pa``)."""
    if model is not None:
        return any(e.key == name and e.spec.angle for e in model.entries)
    from .profiles import available_profiles, get_profile

    angles = {s.name for p in available_profiles() for s in get_profile(p).params if s.angle}
    return any(name == a or name.endswith("_" + a) for a in angles)


def comparison_figure(fitted: dict, reference: dict, *, params=None, labels=None, angles=None,
                      log=None, xlabel="reference", ylabel="fitted", title=None, ncols=None, model=None):
    """Fitted vs reference (truth or another code) per parameter, as the paper's Fig. 3.

    Each panel: points (transparency shows their density), the identity line and R².

    Parameters
    ----------
    fitted, reference : dict
        Parameter name → 1-D array (same galaxies, same order).
    params : list, optional
        Which parameters (default: the keys of ``reference`` also in ``fitted``).
    labels : dict, optional
        Axis label per parameter.
    angles : list, optional
        Parameters that are position angles (default: those declared angles, see ``model``);
        the fitted value is moved by multiples of 180° to the one nearest the reference.
    log : list, optional
        Parameters shown on log-log axes (default none).
    model : Model, optional
        With ``angles`` omitted: the angle parameters are this model's angle entries (its
        table columns); without a model, columns named after an angle parameter of a
        registered profile (``pa`` or ``<component>_pa`` for the built-in profiles).
    """
    params = list(params or [k for k in reference if k in fitted])
    if not params:
        raise OptionsError("no parameter common to fitted and reference")
    labels = labels or {}
    angles = set(angles if angles is not None else [p for p in params if _is_angle(p, model)])
    log = set(log or [])
    ncols = ncols or min(len(params), 5)
    nrows = math.ceil(len(params) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.0 * nrows + (0.3 if title else 0)), layout="constrained")
    for i, p in enumerate(params):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        f = np.asarray(fitted[p], np.float64).ravel()
        r = np.asarray(reference[p], np.float64).ravel()
        if f.shape != r.shape:
            raise OptionsError(f"{p}: fitted has {f.size} values, reference {r.size}")
        if p in angles:
            f = r + wrap_angle(f - r)
        alpha = float(np.clip(30.0 / max(f.size, 1), 0.08, 0.8))
        ax.scatter(r, f, s=10, color="k", alpha=alpha, lw=0)
        ok = np.isfinite(f) & np.isfinite(r)
        if ok.any():
            lo = min(f[ok].min(), r[ok].min())
            hi = max(f[ok].max(), r[ok].max())
            pad = 0.05 * (hi - lo if hi > lo else 1.0)
            lims = (lo - pad, hi + pad) if p not in log else (lo / 1.2, hi * 1.2)
            ax.plot(lims, lims, color="tab:blue", lw=1)
            ax.set_xlim(lims)
            ax.set_ylim(lims)
        if p in log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_aspect("equal", adjustable="box")
        ax.text(0.05, 0.95, f"R² = {r_squared(f, r):.3f}", transform=ax.transAxes, va="top", fontsize=9)
        name = labels.get(p, p)
        ax.set_xlabel(f"{name} ({xlabel})", fontsize=8)
        ax.set_ylabel(f"{name} ({ylabel})", fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------- Fig. 4
def _as_columns(x, labels, what):
    if isinstance(x, dict):
        return {k: np.asarray(x[k], np.float64).ravel() for k in labels}
    arr = np.asarray(x, np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.shape[1] != len(labels):
        raise OptionsError(f"{what}: expected {len(labels)} columns (one per label), got shape {arr.shape}")
    return {k: arr[:, j] for j, k in enumerate(labels)}


def error_comparison_figure(values, err_cov, err_boot, labels=None, *, galaxy_labels=None,
                            centre=False, title=None):
    """Covariance vs bootstrap 1σ error bars per galaxy and parameter (paper Fig. 4).

    Parameters
    ----------
    values, err_cov, err_boot : dict (parameter → 1-D array over galaxies) or 2-D arrays
        ``(n_galaxies, n_params)``: fitted values and the two error estimates.
    labels : list, optional
        Parameter names (required for arrays; default the dict's keys).
    galaxy_labels : list, optional
        Tick labels of the galaxies.
    centre : bool
        Plot value − value (error bars around 0) so small errors remain visible.

    One panel per parameter; blue: covariance errors, red: bootstrap errors.
    """
    if labels is None:
        if not isinstance(values, dict):
            raise OptionsError("labels are needed when values is an array")
        labels = list(values)
    labels = list(labels)
    v = _as_columns(values, labels, "values")
    ec = _as_columns(err_cov, labels, "err_cov")
    eb = _as_columns(err_boot, labels, "err_boot")
    n_gal = len(next(iter(v.values())))
    x = np.arange(n_gal)
    ncols = min(len(labels), 3)
    nrows = math.ceil(len(labels) / ncols)
    fig = Figure(figsize=(4.0 * ncols, 2.6 * nrows + (0.3 if title else 0)), layout="constrained")
    for i, p in enumerate(labels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        y = np.zeros(n_gal) if centre else v[p]
        ax.errorbar(x - 0.12, y, yerr=ec[p], fmt="o", ms=3, color="tab:blue", capsize=2, label="covariance")
        ax.errorbar(x + 0.12, y, yerr=eb[p], fmt="o", ms=3, color="tab:red", capsize=2, label="bootstrap")
        ax.set_ylabel(p + (" − fitted" if centre else ""), fontsize=8)
        ax.set_xticks(x)
        if galaxy_labels is not None:
            ax.set_xticklabels(galaxy_labels, fontsize=6, rotation=30 if n_gal > 1 else 0,
                               ha="right" if n_gal > 1 else "center")
        else:
            ax.set_xticklabels([str(i) for i in x], fontsize=6)
        ax.set_xlim(-0.6, n_gal - 0.4)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------- Fig. C.7
def _scene_arrays(model, obs_or_shape, values, psf, zp, pixel_scale):
    import jax
    import jax.numpy as jnp

    from .data import Observation
    from .model import pack_arrays
    from .psf import check_psf

    if isinstance(obs_or_shape, Observation):
        obs = obs_or_shape
        shape = obs.shape
        psf_img = obs.psf if psf is None else check_psf(psf)
        psf_type = model.psf_type_of(obs)
        zp = obs.zp
        pixel_scale = obs.pixel_scale if pixel_scale is None else pixel_scale
    else:
        shape = tuple(int(s) for s in obs_or_shape)
        psf_img = np.ones((1, 1), np.float32) if psf is None else check_psf(psf)
        psf_type = model.psf_type or "effective"
    # every entry's value: the given values (by owner key or by any sharing component's name),
    # else the model's init, else the profile default
    alias = {f"{c}_{p}": idx for (c, p), idx in model.slots.items()}
    if values is None:
        values = {}
    if not isinstance(values, dict):
        vec = np.asarray(values, np.float64)
    else:
        unknown = set(values) - set(alias)
        if unknown:
            raise KeyError(f"unknown parameter(s) {sorted(unknown)}; the model has {sorted(alias)}")
        vec = np.full(len(model.entries), np.nan)
        for k, v in values.items():
            vec[alias[k]] = float(v)
        for i, e in enumerate(model.entries):
            if np.isnan(vec[i]):
                d = e.param.init if e.param.init is not None else e.spec.default
                if d is None:
                    raise OptionsError(f"no value for {e.key}: give it in values")
                vec[i] = float(d)
    scale = 1.0
    if model.size_unit == "arcsec":
        if not pixel_scale:
            raise OptionsError("the model's sizes are in arcsec: give pixel_scale")
        scale = float(pixel_scale)
    n_free = len(model.free)
    gal = pack_arrays(np.zeros(shape, np.float32), np.ones(shape, np.float32), np.ones(shape, np.float32),
                      psf_img, zp, scale, vec, np.zeros(n_free, np.float32), np.ones(n_free, np.float32),
                      psf_type=psf_type)
    gal = jax.tree_util.tree_map(jnp.asarray, gal)
    return gal, jnp.asarray(vec, jnp.float32)


def scene_images(model, obs_or_shape, values=None, psf=None, *, zp=22.5, pixel_scale=None) -> dict:
    """Model images of a scene without fitting: ``{"unconvolved", "convolved", "components"}``.

    ``unconvolved`` is the sum of every component before the PSF (point sources as their
    flux in the nearest pixel), ``convolved`` the model image M, ``components`` each
    component as it enters M. ``values``: dict keyed ``<component>_<param>`` (shared
    parameters by any of their names; missing ones take the model's init or the profile's
    default) or an entry vector. ``obs_or_shape``: an Observation (its grid, PSF, zero point)
    or an image shape (then ``psf`` or none).
    """
    import jax

    from .geometry import pixel_grid
    from .profiles.builtin import flux_from_mag

    gal, vec = _scene_arrays(model, obs_or_shape, values, psf, zp, pixel_scale)
    shape = gal.image.shape

    def raw(v, g):
        grid = pixel_grid(shape)
        pv = model.component_values(v, g)
        out = {}
        for c in model.components:
            prof, p = model.profiles[c.name], pv[c.name]
            if prof.kind == "point":
                continue
            out[c.name] = model.render_profile(prof, p, grid, shape)
        return out

    render = jax.jit(lambda v, g: (model.render(v, g), model.render_components(v, g), raw(v, g)))
    conv, comps, unconv = render(vec, gal)
    unconv = {k: np.asarray(x, np.float64) for k, x in unconv.items()}
    pv = model.component_values(vec, gal)
    total = sum(unconv.values()) if unconv else np.zeros(shape)
    total = np.array(total, np.float64)
    for c in model.components:
        if model.profiles[c.name].kind == "point":
            p = pv[c.name]
            ix, iy = int(round(float(p["xc"]))), int(round(float(p["yc"])))
            if 0 <= iy < shape[0] and 0 <= ix < shape[1]:
                total[iy, ix] += float(flux_from_mag(p["mag"], p["zp"]))
    return {"unconvolved": total, "convolved": np.asarray(conv, np.float64),
            "components": {k: np.asarray(x, np.float64) for k, x in comps.items()}}


def scene_preview(model, obs_or_shape, values=None, psf=None, *, zp=22.5, pixel_scale=None,
                  title=None, stretch_width=None):
    """A model image before and after PSF convolution, for checking a set-up before fitting
    (the paper's Fig. C.7). Arguments as :func:`scene_images`; ``stretch_width`` is the
    linear width of the asinh stretch (default 1 % of the convolved peak)."""
    imgs = scene_images(model, obs_or_shape, values, psf, zp=zp, pixel_scale=pixel_scale)
    a, b = imgs["unconvolved"], imgs["convolved"]
    vmax = max(float(np.max(a)), float(np.max(b)))
    lw = stretch_width or max(1e-3 * vmax, 1e-2 * float(np.max(b)), 1e-30)
    norm = mcolors.AsinhNorm(linear_width=lw, vmin=min(0.0, float(np.min(b))), vmax=vmax)
    fig = Figure(figsize=(9.0, 4.6 + (0.3 if title else 0)), layout="constrained")
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for ax, img, lab in zip(axes, (a, b), ("(a) model without PSF", "(b) model convolved with the PSF")):
        im = ax.imshow(img, origin="lower", norm=norm, cmap="magma", interpolation="nearest")
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("x [pix]", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("y [pix]", fontsize=8)
    cb = fig.colorbar(im, ax=axes, shrink=0.8)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("image units / pix (asinh stretch)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------- corner + Laplace
def _samples_dict(samples, params):
    if hasattr(samples, "posterior"):
        post = samples.posterior
        return {p: np.asarray(post[p].values, np.float64).reshape(-1) for p in params}
    return {p: np.asarray(samples[p], np.float64).reshape(-1) for p in params}


def _levels_enclosing(h, xc, yc, x, y, masses):
    """Density levels of a (smoothed) 2-D histogram ``h`` on bin centres ``xc, yc`` whose
    contours enclose the fractions ``masses`` of the samples ``(x, y)``.

    The density is interpolated at every sample as the contour lines are, so a contour
    encloses the stated fraction of the draws whatever the smoothing (a level taken from the
    histogram's own mass would be biased outwards by it).
    """
    from scipy.interpolate import RegularGridInterpolator

    interp = RegularGridInterpolator((xc, yc), h, bounds_error=False, fill_value=0.0)
    dens = interp(np.column_stack([x, y]))
    return [float(np.quantile(dens, 1.0 - m)) for m in masses]


def _cov_ellipse(mean2, cov2, k, **kw):
    vals, vecs = np.linalg.eigh(cov2)
    vals = np.clip(vals, 0, None)
    angle = math.degrees(math.atan2(vecs[1, 1], vecs[0, 1]))
    return Ellipse(mean2, 2 * k * math.sqrt(vals[1]), 2 * k * math.sqrt(vals[0]), angle=angle, fill=False, **kw)


def corner_with_laplace(samples, mean, cov, params, *, labels=None, truths=None, bins=30,
                        title=None, max_points=4000):
    """Corner plot of posterior samples with the Laplace approximation over it.

    Diagonal: sample histograms with the Laplace Gaussian N(mean_i, cov_ii). Below it: the
    samples (points and their 39 %/86 % highest-density contours, the 2-D 1σ/2σ levels) and
    the Laplace 1σ and 2σ ellipses (Mahalanobis distance 1 and 2, enclosing the same masses
    for a Gaussian), so the two can be compared directly.

    Parameters
    ----------
    samples : dict (parameter → array of draws, any shape) or arviz.InferenceData
        The posterior (e.g. NUTS); an InferenceData's ``posterior`` group is used.
    mean : array or dict
        Laplace mean (the MAP) in the order of ``params``.
    cov : (P, P) array
        Laplace covariance in the same coordinates and order.
    params : list of str
        Parameters to show.
    truths : array or dict, optional
        True values, drawn as thin lines.
    """
    from scipy.ndimage import gaussian_filter

    params = list(params)
    P = len(params)
    s = _samples_dict(samples, params)
    if isinstance(mean, dict):
        mean = [mean[p] for p in params]
    mean = np.asarray(mean, np.float64).reshape(P)
    cov = np.asarray(cov, np.float64).reshape(P, P)
    if truths is not None and isinstance(truths, dict):
        truths = [truths.get(p, np.nan) for p in params]
    labels = labels or {}
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    ranges = []
    for i, p in enumerate(params):
        x = s[p][np.isfinite(s[p])]
        lo, hi = (np.percentile(x, [0.5, 99.5]) if x.size else (mean[i] - 1, mean[i] + 1))
        lo, hi = min(lo, mean[i] - 3 * sd[i]), max(hi, mean[i] + 3 * sd[i])
        if not hi > lo:
            lo, hi = lo - 1, hi + 1
        ranges.append((lo, hi))
    fig = Figure(figsize=(1.9 * P + 0.8, 1.9 * P + 0.8 + (0.3 if title else 0)), layout="constrained")
    gs = fig.add_gridspec(P, P)
    axes = np.empty((P, P), dtype=object)
    rng = np.random.default_rng(0)
    for i in range(P):
        for j in range(i + 1):
            ax = fig.add_subplot(gs[i, j], sharex=axes[j, j] if i > j else None)
            axes[i, j] = ax
            xi = s[params[j]]
            if i == j:
                ax.hist(xi, bins=bins, range=ranges[j], density=True, histtype="stepfilled", color="0.75",
                        edgecolor="0.3")
                g = np.linspace(*ranges[j], 200)
                if sd[j] > 0:
                    ax.plot(g, np.exp(-0.5 * ((g - mean[j]) / sd[j]) ** 2) / (sd[j] * math.sqrt(2 * math.pi)),
                            color="tab:red", lw=1.3)
                ax.set_yticks([])
                ax.set_xlim(ranges[j])
            else:
                yi = s[params[i]]
                idx = np.arange(xi.size)
                if xi.size > max_points:
                    idx = rng.choice(xi.size, max_points, replace=False)
                ax.scatter(xi[idx], yi[idx], s=3, color="0.5", alpha=0.35, lw=0, rasterized=True)
                nb2 = int(np.clip(np.sqrt(xi.size) / 1.5, 8, bins))
                ok = np.isfinite(xi) & np.isfinite(yi)
                h, xe, ye = np.histogram2d(xi[ok], yi[ok], bins=nb2, range=[ranges[j], ranges[i]])
                h = gaussian_filter(h, 1.0)
                xc_, yc_ = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
                levels = []
                if ok.sum() > 10:     # HDR masses of the 2-D 1σ and 2σ levels
                    levels = _levels_enclosing(h, xc_, yc_, xi[ok], yi[ok], (0.864665, 0.393469))
                levels = sorted({lv for lv in levels if np.isfinite(lv) and 0 < lv < h.max()})
                if levels:
                    ax.contour(xc_, yc_, h.T, levels=levels, colors="k", linewidths=0.8)
                sub = cov[np.ix_([j, i], [j, i])]
                for k, ls in ((1, "-"), (2, "--")):
                    ax.add_patch(_cov_ellipse((mean[j], mean[i]), sub, k, edgecolor="tab:red", lw=1.2, ls=ls))
                ax.set_xlim(ranges[j])
                ax.set_ylim(ranges[i])
                if truths is not None:
                    ax.axhline(truths[i], color="tab:blue", lw=0.7)
            if truths is not None and np.isfinite(truths[j]):
                ax.axvline(truths[j], color="tab:blue", lw=0.7)
            ax.tick_params(labelsize=6)
            if i == P - 1:
                ax.set_xlabel(labels.get(params[j], params[j]), fontsize=8)
            else:
                ax.tick_params(labelbottom=False)
            if j == 0 and i > 0:
                ax.set_ylabel(labels.get(params[i], params[i]), fontsize=8)
            elif j > 0:
                ax.tick_params(labelleft=False)
    fig.text(0.98, 0.90 if title else 0.98, "grey points, black contours: samples (39 %, 86 % HDR)\n"
             "red: Laplace 1σ (solid), 2σ (dashed)" + ("\nblue: truth" if truths is not None else ""),
             ha="right", va="top", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

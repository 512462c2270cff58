"""Inference on batches of galaxies: MAP (SVI + optax, LM polish), and error estimates."""
from .bootstrap import BootstrapResult, bootstrap_errors
from .laplace import LaplaceResult, invert_curvature, laplace_errors, loglike_curvature
from .map import OPTIMIZERS, MapOptions, MapResult, fit_map
from .nuts import NutsResult, run_nuts, save_posteriors, summary_rows, to_inference_data

__all__ = ["OPTIMIZERS", "MapOptions", "MapResult", "fit_map",
           "LaplaceResult", "laplace_errors", "loglike_curvature", "invert_curvature",
           "BootstrapResult", "bootstrap_errors",
           "NutsResult", "run_nuts", "save_posteriors", "summary_rows", "to_inference_data"]

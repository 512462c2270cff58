"""Inference on batches of galaxies: MAP (SVI + optax, LM polish), and error estimates."""
from .map import OPTIMIZERS, MapOptions, MapResult, fit_map

__all__ = ["OPTIMIZERS", "MapOptions", "MapResult", "fit_map"]

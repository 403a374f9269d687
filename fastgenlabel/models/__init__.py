"""Class-conditional generative models: fit, merge statistics, log-likelihood, safe files."""
from .base import ClassModel, FitWarning, NotFittedError, load_model
from .gaussian import GaussianClassModel, GaussianStats
from .io import ModelFileError
from .kde import KDEClassModel, KDEStats

__all__ = [
    "ClassModel", "FitWarning", "GaussianClassModel", "GaussianStats", "KDEClassModel", "KDEStats", "ModelFileError",
    "NotFittedError", "load_model",
]

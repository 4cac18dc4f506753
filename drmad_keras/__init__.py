"""Gradient-based tuning of L2 penalties for Keras models, by DrMAD."""

from drmad_keras.model import DrMADModel
from drmad_keras.model import Hypergradient
from drmad_keras.optimizers import MomentumSGD
from drmad_keras.regularizer import HyperRegularizer
from drmad_keras.reverse import DivergenceError
from drmad_keras.tuner import DrMADOracle
from drmad_keras.tuner import DrMADTuner

__version__ = "0.1.0"

__all__ = [
    "DivergenceError",
    "DrMADModel",
    "DrMADOracle",
    "DrMADTuner",
    "HyperRegularizer",
    "Hypergradient",
    "MomentumSGD",
]

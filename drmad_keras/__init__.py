"""Gradient-based tuning of L2 penalties for Keras models, by DrMAD.

The public names load on first use, so that `drmad_keras.config` and
`drmad_keras.checks` can be imported without starting TensorFlow.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "DivergenceError": "drmad_keras.reverse",
    "DrMADModel": "drmad_keras.model",
    "DrMADOracle": "drmad_keras.tuner",
    "DrMADTuner": "drmad_keras.tuner",
    "HyperRegularizer": "drmad_keras.regularizer",
    "Hypergradient": "drmad_keras.model",
    "MomentumSGD": "drmad_keras.optimizers",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'drmad_keras' has no attribute {name!r}")

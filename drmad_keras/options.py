"""Names of the choices the package offers, and data sizes.

Kept free of TensorFlow so that settings can be checked before it loads.
"""

METHODS = ("drmad", "exact")
CURVATURES = ("hessian", "gauss_newton")
META_OPTIMIZERS = ("adam", "sign_sgd")
SOURCES = ("mnist_sample", "mnist")
ACTIVATIONS = ("tanh", "relu", "sigmoid", "elu", "softplus")
GRANULARITIES = ("layer", "unit")

# (training images, test images) of each source; the sample has no
# official test split, so all of its splits come from one pool.
SOURCE_SIZES = {"mnist_sample": (5000, None), "mnist": (60000, 10000)}

# Kinds of hyperparameter a DrMADModel can tune, each one per
# HyperRegularizer-wrapped layer: the L2 strength, the step size and the
# momentum of the layer's weights (optionally per schedule block), and the
# scale of its initial kernel.
KINDS = ("log_l2", "log_lr", "logit_momentum", "log_init_scale")
OPTIMIZER_KINDS = ("log_lr", "logit_momentum")

# Default clip range of each kind in the tuner.
RANGES = {
    "log_l2": (-12.0, 2.0),
    "log_lr": (-10.0, 2.0),
    "logit_momentum": (-6.0, 6.0),
    "log_init_scale": (-4.0, 2.0),
}

# Values beyond which a kind's transform saturates in float32 (a step size
# of 0, a momentum of 1, an initial scale that overflows): refused.
LIMITS = {
    "log_lr": (-30.0, 10.0),
    "logit_momentum": (-15.0, 15.0),
    "log_init_scale": (-20.0, 10.0),
}

# Methods of DrMADTuner: the two reverse passes, and online tuning inside
# one training run.
TUNER_METHODS = METHODS + ("t1t2",)


def kind_of(name):
    """The kind of a hyperparameter name (`"log_lr_dense"` -> `"log_lr"`),
    or None for a name that is no tuned hyperparameter."""
    for kind in KINDS:
        if name.startswith(kind + "_"):
            return kind
    return None

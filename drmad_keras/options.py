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

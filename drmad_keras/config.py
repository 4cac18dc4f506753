"""`Config`: the settings of one run of the main job.

It imports no TensorFlow, so that `bin/train_mnist` can refuse bad flags at
once.
"""

import dataclasses

from drmad_keras import checks
from drmad_keras import options


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run of the main job depends on.

    The defaults follow the DrMAD paper's MNIST setting (784-50-50-50-10
    tanh, batch 50, momentum 0.9), scaled to the 5,000-image sample.
    """

    source: str = "mnist_sample"
    data_dir: str = None
    eset: int = 2000
    hset: int = 1000
    vset: int = 1000
    test: int = 1000
    hidden: tuple = (50, 50, 50)
    activation: str = "tanh"
    episodes: int = 20
    steps: int = 1000
    batch_size: int = 50
    learning_rate: float = 0.1
    momentum: float = 0.9
    init_log_l2: float = -3.0
    granularity: str = "layer"
    meta_optimizer: str = "adam"
    meta_learning_rate: float = 0.2
    method: str = "drmad"
    curvature: str = None
    reverse_steps: int = None
    tune: tuple = ("log_l2",)
    schedule_blocks: int = 1
    t1t2_interval: int = 10
    # Clip ranges of kinds other than log_l2: ((kind, low, high), ...).
    ranges: tuple = ()
    seed: int = 0
    output_dir: str = "runs/mnist"
    gpu: bool = False
    verbose: object = "auto"

    def __post_init__(self):
        checks.one_of("source", self.source, options.SOURCES)
        for name in (
            "eset",
            "hset",
            "vset",
            "test",
            "episodes",
            "steps",
            "batch_size",
        ):
            checks.positive_int(name, getattr(self, name))
        if not self.hidden:
            raise ValueError("hidden must name at least one layer size.")
        for size in self.hidden:
            checks.positive_int("hidden size", size)
        checks.one_of("activation", self.activation, options.ACTIVATIONS)
        if self.batch_size > self.eset:
            raise ValueError(
                f"batch_size {self.batch_size} is larger than ESet "
                f"({self.eset} examples)."
            )
        checks.positive_float("learning_rate", self.learning_rate)
        checks.float_in_range("momentum", self.momentum, 0.0, 1.0)
        checks.float_in_range("init_log_l2", self.init_log_l2, -12.0, 2.0)
        checks.one_of("granularity", self.granularity, options.GRANULARITIES)
        checks.one_of(
            "meta_optimizer", self.meta_optimizer, options.META_OPTIMIZERS
        )
        checks.positive_float("meta_learning_rate", self.meta_learning_rate)
        checks.one_of("method", self.method, options.TUNER_METHODS)
        if isinstance(self.tune, str) or not self.tune:
            raise ValueError(
                f"tune must name at least one of {options.KINDS}; got "
                f"{self.tune!r}."
            )
        for kind in self.tune:
            checks.one_of("tune", kind, options.KINDS)
        if len(set(self.tune)) != len(self.tune):
            raise ValueError(f"tune names a kind twice: {self.tune}.")
        checks.positive_int("schedule_blocks", self.schedule_blocks)
        if self.schedule_blocks > self.steps:
            raise ValueError(
                f"schedule_blocks ({self.schedule_blocks}) cannot exceed "
                f"steps ({self.steps})."
            )
        checks.positive_int("t1t2_interval", self.t1t2_interval)
        for entry in self.ranges:
            if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                raise ValueError(
                    f"ranges takes (kind, low, high) entries; got {entry!r}."
                )
            kind, low, high = entry
            checks.one_of("ranges kind", kind, options.KINDS[1:])
            low = checks.finite_float(f"{kind} range", low)
            high = checks.finite_float(f"{kind} range", high)
            if not low < high:
                raise ValueError(
                    f"the {kind} range must have low < high; got "
                    f"{low:g}, {high:g}."
                )
        kinds = [entry[0] for entry in self.ranges]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"ranges names a kind twice: {kinds}.")
        if self.schedule_blocks > 1 and not set(self.tune) & set(
            options.OPTIMIZER_KINDS
        ):
            raise ValueError(
                "schedule_blocks gives log_lr and logit_momentum one value "
                f"per block; tune={','.join(self.tune)} has neither."
            )
        if self.method == "t1t2":
            if tuple(self.tune) != ("log_l2",):
                raise ValueError(
                    "method t1t2 tunes log_l2 only; got tune="
                    f"{','.join(self.tune)}."
                )
            for name in ("curvature", "reverse_steps"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} belongs to the reverse pass of drmad and "
                        "exact; method t1t2 has none."
                    )
            if self.batch_size > self.hset:
                raise ValueError(
                    f"batch_size {self.batch_size} is larger than HSet "
                    f"({self.hset} examples); t1t2 draws HSet batches of "
                    "batch_size."
                )
        if "logit_momentum" in self.tune and self.momentum == 0.0:
            raise ValueError(
                "tuning logit_momentum needs a momentum above 0 to start from."
            )
        if "log_init_scale" in self.tune and self.reverse_steps is not None:
            raise ValueError(
                "tuning log_init_scale needs the whole reverse pass; drop "
                "reverse_steps."
            )
        if self.curvature is not None:
            checks.one_of("curvature", self.curvature, options.CURVATURES)
        if self.reverse_steps is not None:
            checks.positive_int("reverse_steps", self.reverse_steps)
            if self.reverse_steps > self.steps:
                raise ValueError(
                    f"reverse_steps ({self.reverse_steps}) cannot exceed "
                    f"steps ({self.steps})."
                )

        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer; got {self.seed!r}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32); got {self.seed}.")
        training, test = options.SOURCE_SIZES[self.source]
        fitted = self.eset + self.hset + self.vset
        if test is None:
            too_many = fitted + self.test > training
            has = f"{training} images"
        else:
            too_many = fitted > training or self.test > test
            has = f"{training} training and {test} test images"
        if too_many:
            raise ValueError(
                f"the splits (eset {self.eset}, hset {self.hset}, vset "
                f"{self.vset}, test {self.test}) ask for more images than "
                f"{self.source} has ({has})."
            )

    def chain_settings(self):
        """The settings a resumed run must share with the one it resumes
        (all but the number of episodes and how output looks)."""
        settings = dataclasses.asdict(self)
        for name in ("episodes", "output_dir", "gpu", "verbose"):
            settings.pop(name)
        if self.source == "mnist_sample":
            settings.pop("data_dir")
        settings["hidden"] = list(self.hidden)
        settings["tune"] = list(self.tune)
        settings["ranges"] = [list(entry) for entry in self.ranges]
        return settings

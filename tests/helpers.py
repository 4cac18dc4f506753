"""Small models for the tests."""

import keras

import drmad_keras


def mlp(
    inputs,
    hidden,
    granularity="layer",
    init_log_l2=-3.0,
    alpha=0.1,
    gamma=0.9,
    activation="tanh",
    tune=("log_l2",),
    schedule_blocks=1,
):
    """A compiled DrMADModel MLP with every Dense layer regularized."""
    x_in = keras.Input((inputs,))
    h = x_in
    for i, width in enumerate(hidden):
        h = drmad_keras.HyperRegularizer(
            keras.layers.Dense(width, activation=activation, name=f"h{i}"),
            init_log_l2=init_log_l2,
            granularity=granularity,
        )(h)
    out = drmad_keras.HyperRegularizer(
        keras.layers.Dense(10, name="out"),
        init_log_l2=init_log_l2,
        granularity=granularity,
    )(h)
    model = drmad_keras.DrMADModel(x_in, out)
    model.compile(
        optimizer=drmad_keras.MomentumSGD(alpha=alpha, gamma=gamma),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        tune=tune,
        schedule_blocks=schedule_blocks,
    )
    return model


def reset_to(model, theta):
    """Sets the model's trainable weights to the tensors in `theta`."""
    for var, value in zip(model.trainable_variables, theta):
        var.assign(value)

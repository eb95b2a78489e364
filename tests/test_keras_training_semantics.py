"""What actually keeps a Keras 3 BatchNormalization's moving statistics still during fit() (BN408's advice).

Each case builds a tiny backbone (Dense -> BatchNormalization -> Dense) inside an outer functional
model, fits a few steps on data far from the statistics' initial values (mean 3) and looks at the
backbone's moving mean. Run on the torch backend (no TensorFlow here), the backend users of bnlint
have. Observed with Keras 3.15.1:

- (a) `base(x, training=False)` then `base.trainable = True`: the statistics MOVE. The outer
  functional model passes its own `training=True` to every layer that takes `training`, over
  the value recorded when the graph was built (keras/src/models/functional.py `operation_fn`).
- (b) `bn.trainable = False`: still. BatchNormalization.call updates only `if training and
  self.trainable`, and normalises with the moving statistics otherwise.
- (c) `base.trainable = False`: still (it sets every sublayer's trainable, BN included).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before any import of keras: no TensorFlow here

keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")
pytest.importorskip("torch")


def _moving_mean_shift(case: str) -> float:
    """How far fit() moved the backbone BatchNormalization's moving mean (max abs change)."""
    from keras import layers

    keras.utils.set_random_seed(0)
    inner = keras.Input((4,))
    hidden = layers.BatchNormalization(name="bn")(layers.Dense(8)(inner))
    base = keras.Model(inner, layers.Dense(8)(hidden), name="base")
    outer = keras.Input((4,))
    if case == "call-training-false":
        features = base(outer, training=False)
        base.trainable = True  # fine-tuning the backbone's weights, statistics meant to stay
    else:
        features = base(outer)
    if case == "bn-not-trainable":
        base.get_layer("bn").trainable = False
    elif case == "base-not-trainable":
        base.trainable = False
    model = keras.Model(outer, layers.Dense(1)(features))
    model.compile(optimizer="sgd", loss="mse")
    bn = base.get_layer("bn")
    before = np.array(bn.moving_mean.numpy(), copy=True)
    data = np.random.RandomState(1).normal(3.0, 2.0, (64, 4)).astype("float32")
    model.fit(data, np.zeros((64, 1), "float32"), batch_size=16, epochs=1, verbose=0)
    return float(np.abs(np.array(bn.moving_mean.numpy()) - before).max())


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch backend is the one examined")
def test_what_protects_moving_statistics_in_fit() -> None:
    shifts = {case: _moving_mean_shift(case) for case in
              ("control", "call-training-false", "bn-not-trainable", "base-not-trainable")}
    assert shifts["control"] > 1e-3  # the setup moves statistics at all
    # (a) The call argument training=False does not protect them on Keras 3 (seen on 3.15.1):
    # the outer model's training=True wins. If a Keras release changes this, BN408's text must too.
    assert shifts["call-training-false"] > 1e-3, f"Keras {keras.__version__}: training=False now protects"
    assert shifts["bn-not-trainable"] == 0.0  # (b)
    assert shifts["base-not-trainable"] == 0.0  # (c)


def test_bn408_advice_matches_what_fit_does() -> None:
    """BN408 recommends the flags that protect the statistics, never the call argument alone."""
    from bnlint.rules import all_rules

    spec = all_rules()["BN408"]
    assert "trainable = False" in spec.doc and "trainable=False" in spec.fix
    use_instead = spec.doc.split("## Use instead", 1)[1].split("## References", 1)[0]
    assert "training=False" not in use_instead  # the call argument alone did not protect them
    assert "3.15" in spec.doc  # the Keras version the finding was observed with

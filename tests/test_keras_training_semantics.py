"""What actually keeps a Keras 3 BatchNormalization's moving statistics still during fit() (BN408's advice).

Each case builds a tiny backbone (Dense -> BatchNormalization -> Dense) inside an outer model,
fits a few steps on data far from the statistics' initial values (mean 3) and looks at the
backbone's moving mean. Run on the torch backend here (no TensorFlow in the project's venv).
Observed with Keras 3.15.1, and the same on the TensorFlow backend (TensorFlow 2.21, the
opt-in test below; moving-mean shifts 0.170 where torch gives 0.232, 0.0 in the same cases):

- (a) `base(x, training=False)` in an outer Functional model, base trainable: the statistics
  MOVE. The outer model passes its own `training` value (fit(): True) to every recorded call
  whenever it is not None, over the value recorded when the graph was built
  (keras/src/models/functional.py `operation_fn`). Backend-independent code, so every backend.
- (a') the transfer-learning guide's order: `base.trainable = False`, `base(x, training=False)`,
  compile, then `base.trainable = True` and compile again: the statistics MOVE, as in (a).
- (b) `bn.trainable = False`: still. BatchNormalization.call updates only `if training and
  self.trainable`, and normalises with the moving statistics otherwise.
- (c) `base.trainable = False`: still (it sets every sublayer's trainable, BN included).
- (d) a subclassed outer model whose call() does `self.base(x, training=False)`: still; an
  explicit argument wins over the outer call's (keras/src/layers/layer.py
  `_resolve_and_populate_arg`). A config cannot record this: it is code.
- tf.keras 2 (tf_keras 2.21, not here) honours the recorded value: (a) and (a') stay still there
  (its Functional model calls each layer with the recorded arguments, and an explicit argument
  wins), which is why older guides say training=False is enough.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before any import of keras: no TensorFlow here

keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")
pytest.importorskip("torch")


class _Outer(keras.Model):  # type: ignore[misc]
    """A subclassed model whose call() passes training=False to the backbone itself."""

    def __init__(self, base: Any, head: Any) -> None:
        super().__init__(name="outer")  # TensorFlow scopes refuse the default "_outer"
        self.base, self.head = base, head

    def call(self, x: Any, training: Any = None) -> Any:
        return self.head(self.base(x, training=False))


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
    elif case == "guide-freeze-then-unfreeze":
        base.trainable = False
        features = base(outer, training=False)
    else:
        features = base(outer)
    if case == "bn-not-trainable":
        base.get_layer("bn").trainable = False
    elif case == "base-not-trainable":
        base.trainable = False
    if case == "subclassed-call-training-false":
        model: Any = _Outer(base, layers.Dense(1))
        model(np.zeros((1, 4), "float32"))
    else:
        model = keras.Model(outer, layers.Dense(1)(features))
    if case == "guide-freeze-then-unfreeze":
        model.compile(optimizer="sgd", loss="mse")  # stage 1: the head alone
        base.trainable = True  # stage 2: unfreeze and compile again, as the guide does
    model.compile(optimizer="sgd", loss="mse")
    bn = base.get_layer("bn")
    before = np.array(bn.moving_mean.numpy(), copy=True)
    data = np.random.RandomState(1).normal(3.0, 2.0, (64, 4)).astype("float32")
    model.fit(data, np.zeros((64, 1), "float32"), batch_size=16, epochs=1, verbose=0)
    return float(np.abs(np.array(bn.moving_mean.numpy()) - before).max())


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="the torch backend is the one examined")
def test_what_protects_moving_statistics_in_fit() -> None:
    _assert_semantics({case: _moving_mean_shift(case) for case in CASES}, keras.__version__)


CASES = ("control", "call-training-false", "guide-freeze-then-unfreeze", "bn-not-trainable", "base-not-trainable",
         "subclassed-call-training-false")


def _assert_semantics(shifts: dict[str, float], version: str) -> None:
    assert shifts["control"] > 1e-3  # the setup moves statistics at all
    # (a), (a') The call argument training=False does not protect them on Keras 3 (seen on 3.15.1):
    # the outer model's training=True wins. If a Keras release changes this, BN408's text must too.
    assert shifts["call-training-false"] > 1e-3, f"Keras {version}: training=False now protects"
    assert shifts["guide-freeze-then-unfreeze"] > 1e-3, f"Keras {version}: training=False now protects"
    assert shifts["bn-not-trainable"] == 0.0  # (b)
    assert shifts["base-not-trainable"] == 0.0  # (c)
    assert shifts["subclassed-call-training-false"] == 0.0  # (d)


# --- end of the fit cases (the TensorFlow test below runs what is above this line)


# Runs the part of this file above the end marker with a stand-in for pytest (TensorFlow's Python
# need not have pytest or torch), then prints the shifts as JSON and the backend.
_TF_SCRIPT = """
import json, sys, types
def importorskip(name):
    try:
        return __import__(name)
    except ImportError:
        return None
sys.modules["pytest"] = types.SimpleNamespace(importorskip=importorskip,
                                              mark=types.SimpleNamespace(skipif=lambda *a, **k: lambda f: f))
exec(open({path!r}).read().split("# --- end of the fit cases")[0])
print(json.dumps({{case: _moving_mean_shift(case) for case in CASES}}), keras.backend.backend())
"""


@pytest.mark.skipif(not os.environ.get("BNLINT_TF_PYTHON"), reason="opt-in: BNLINT_TF_PYTHON=<python with keras 3 "
                    "and tensorflow>, e.g. /tmp/tfenv/bin/python (about 20 s)")
def test_same_semantics_on_the_tensorflow_backend() -> None:
    """The same cases, this file's own code, run by a Python that has TensorFlow (KERAS_BACKEND=tensorflow)."""
    script = _TF_SCRIPT.format(path=str(Path(__file__)))
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([os.environ["BNLINT_TF_PYTHON"], "-c", script], capture_output=True, text=True, timeout=300,
                          env=env, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    shifts, backend = line.rsplit(" ", 1)
    assert backend == "tensorflow"
    _assert_semantics(json.loads(shifts), "(tensorflow backend)")



def test_bn408_advice_matches_what_fit_does() -> None:
    """BN408 recommends the flags that protect the statistics, never the call argument alone."""
    from bnlint.rules import all_rules

    spec = all_rules()["BN408"]
    assert "trainable = False" in spec.doc and "trainable=False" in spec.fix
    use_instead = spec.doc.split("## Use instead", 1)[1].split("## References", 1)[0]
    assert "training=False" not in use_instead  # the call argument alone did not protect them
    assert "3.15" in spec.doc  # the Keras version the finding was observed with
    # Backend-independent (functional.py), seen on torch and TensorFlow: the text must not limit it to one.
    assert "every backend" in spec.fix and "torch and the TensorFlow backends" in spec.doc
    assert "operation_fn" in spec.doc and "tf.keras 2 honours" in spec.doc

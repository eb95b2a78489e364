"""Is this a BatchNorm, another normalisation, or neither? One answer for every framework.

Loaders (pickled/scripted torch modules, live modules, ONNX ops, Keras layers, Caffe layers) and
the dynamic runners all ask here, by class or op name, so that a class counted as BatchNorm in one
place is counted the same everywhere. Torch-free: names only.
"""

from __future__ import annotations

import re
from typing import Iterable, Literal

NormKind = Literal["bn", "bn-like", "other-norm", "other"]

# Classes / op types that are BatchNorm for certain, by framework.
BATCHNORM_NAMES: dict[str, frozenset[str]] = {
    "torch": frozenset({
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d",
        "LazyBatchNorm3d", "FrozenBatchNorm2d", "FrozenBatchNorm", "NaiveSyncBatchNorm", "BatchNormAct2d",
        "SyncBatchNormAct", "FrozenBatchNormAct2d", "_BatchNorm",  # not _NormBase: InstanceNorm's base too
    }),
    "onnx": frozenset({"BatchNormalization"}),
    # tf.keras 2 saved BatchNormalization under the V1/V2 names too.
    "keras": frozenset({"BatchNormalization", "SyncBatchNormalization", "BatchNormalizationV1", "BatchNormalizationV2"}),
    "caffe": frozenset({"BatchNorm", "BN"}),  # "BN": the SegNet/PSPNet forks' fused BN+scale layer
    # TensorFlow graphs: the fused kernels (tf.keras fused=True and tf.nn.fused_batch_norm).
    "tensorflow": frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}),
}

# Frozen variants never update their statistics, whatever the mode.
FROZEN_NAMES = frozenset({"FrozenBatchNorm2d", "FrozenBatchNorm", "FrozenBatchNormAct2d"})

# Other normalisations: they normalise per sample (or keep preprocessing statistics), so BatchNorm's
# rules do not apply; they are listed in BN002's message instead of being linted.
OTHER_NORM_PATTERN = re.compile(
    r"InstanceNorm|GroupNorm|LayerNorm|RMSNorm|LocalResponseNorm|CrossMapLRN|^LRN$|^MVN$"
    r"|^Normalization$|UnitNormalization|SpectralNormalization"
)
# Names that suggest BatchNorm when the class is not a known one (a user's subclass or fork).
BN_NAME_PATTERN = re.compile(r"BatchNorm|SyncBN|(^|[^A-Za-z])BN(\d?d)?$")


def short_name(class_name: str) -> str:
    """`torch.nn.modules.batchnorm.BatchNorm2d` -> `BatchNorm2d`."""
    return class_name.rsplit(".", 1)[-1]


def classify(class_name: str, framework: str, *, has_running_stats: bool = False, has_eps: bool = False) -> NormKind:
    """'bn' (a known BatchNorm class/op), 'bn-like' (inferred), 'other-norm' or 'other'.

    `has_running_stats`/`has_eps` let an unknown torch class with BatchNorm's buffers count as
    BN-like (a fork of `_BatchNorm` under another name).
    """
    short = short_name(class_name)
    if short in BATCHNORM_NAMES.get(framework, frozenset()):
        return "bn"
    if OTHER_NORM_PATTERN.search(short):
        return "other-norm"
    if framework == "torch" and (BN_NAME_PATTERN.search(short) or (has_running_stats and has_eps)):
        return "bn-like"
    return "other"


ONNX_DOMAINS = ("", "ai.onnx")  # the default operator set (a custom domain's BatchNormalization is not ONNX's)


def is_batchnorm_op(op_type: str, domain: str = "", framework: str = "onnx") -> bool:
    """A graph node that is BatchNorm: ONNX's BatchNormalization in the default domain."""
    return op_type in BATCHNORM_NAMES.get(framework, frozenset()) and domain in ONNX_DOMAINS


def is_batchnorm_class(names: Iterable[str], framework: str = "torch") -> bool:
    """True when one of the class names (a class and its bases, most derived first) is BatchNorm
    and the class itself is not another normalisation."""
    names = list(names)
    if names and classify(names[0], framework) == "other-norm":
        return False
    return any(classify(name, framework) == "bn" for name in names)


# Regularisers that are random in training and off in eval: with one upstream, statistics
# estimated in train mode see a larger variance than eval mode produces ("variance shift").
STOCHASTIC_PATTERN = re.compile(r"Dropout|DropPath|DropBlock|StochasticDepth|DropConnect|GaussianNoise")


def is_stochastic(class_name: str) -> bool:
    """Dropout and its relatives (any framework's class or op name)."""
    return bool(STOCHASTIC_PATTERN.search(short_name(class_name)))


def is_frozen(class_name: str) -> bool:
    return short_name(class_name) in FROZEN_NAMES

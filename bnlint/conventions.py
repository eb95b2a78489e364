"""What each framework means by its BatchNorm settings: one table, read by rules and messages.

Every loader stores `BNLayer.momentum` in PyTorch's convention (the weight of the *new* batch) and
the framework's own number in `BNLayer.raw_momentum`; this table says how to turn one into the
other, what the defaults are, how the framework stores the variance, and what puts BatchNorm in
inference mode. A new format is one row here (see README "Formats").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MomentumWeight = Literal["new", "old"]  # what the framework's momentum multiplies in the update


@dataclass(frozen=True)
class Conventions:
    framework: str  # BNLayer.framework
    display: str  # the name shown in messages
    default_eps: float
    default_momentum: float | None  # in the framework's own convention (None: no momentum setting)
    momentum_weights: MomentumWeight
    momentum_name: str  # the setting's own name
    stored_variance: Literal["unbiased", "biased"]  # what the running/moving variance estimates
    inference_mode: str  # what makes BatchNorm use its stored statistics, for messages
    # The framework's own names of bnlint's four BN tensors (weight, bias, running_mean, running_var).
    tensor_names: tuple[str, str, str, str]
    reestimate: str  # how to re-estimate the statistics in this framework, for fix texts

    def tensor(self, role: str) -> str:
        """The framework's name for one of bnlint's tensor roles, e.g. running_var -> moving_variance."""
        return dict(zip(("weight", "bias", "running_mean", "running_var"), self.tensor_names)).get(role, role)

    def torch_momentum(self, raw: float) -> float:
        """The framework's momentum as PyTorch's (the weight of the new batch)."""
        return raw if self.momentum_weights == "new" else 1.0 - raw

    def own_momentum(self, torch_momentum: float) -> float:
        """PyTorch's momentum in this framework's convention."""
        return torch_momentum if self.momentum_weights == "new" else 1.0 - torch_momentum

    def describe_momentum(self, raw: float) -> str:
        """e.g. "Keras momentum 0.1 (weight 90% on each new batch)"."""
        new = self.torch_momentum(raw)
        return f"{self.display} {self.momentum_name} {_num(raw)} (weight {new:.0%} on each new batch)"


def _num(value: float) -> str:
    return f"{value:.3g}"


CONVENTIONS: dict[str, Conventions] = {
    "torch": Conventions(
        framework="torch", display="PyTorch", default_eps=1e-5, default_momentum=0.1, momentum_weights="new",
        momentum_name="momentum", stored_variance="unbiased",
        inference_mode="model.eval() (eval mode reads the running statistics and updates nothing)",
        tensor_names=("weight", "bias", "running_mean", "running_var"),
        reestimate="torch.optim.swa_utils.update_bn(loader, model) or `bnlint fix` (exact, layer by layer)",
    ),
    "onnx": Conventions(
        framework="onnx", display="ONNX", default_eps=1e-5, default_momentum=0.9, momentum_weights="old",
        momentum_name="momentum", stored_variance="unbiased",
        inference_mode="a BatchNormalization node with one output (training_mode=0)",
        tensor_names=("scale", "B", "input_mean", "input_var"),
        reestimate="re-estimate in the source framework and export again, or `bnlint fix` on the ONNX file",
    ),
    "keras": Conventions(
        framework="keras", display="Keras", default_eps=1e-3, default_momentum=0.99, momentum_weights="old",
        momentum_name="momentum", stored_variance="biased",
        inference_mode="training=False, or trainable=False on the BatchNormalization layer (inference mode even inside fit)",
        tensor_names=("gamma", "beta", "moving_mean", "moving_variance"),
        reestimate="run the BatchNormalization layers in training mode over the data with momentum near 0 "
        "(or `bnlint fix`, exact), never on one small batch",
    ),
    "caffe": Conventions(
        framework="caffe", display="Caffe", default_eps=1e-5, default_momentum=0.999, momentum_weights="old",
        momentum_name="moving_average_fraction", stored_variance="unbiased",
        inference_mode="use_global_stats: true (the TEST-phase default)",
        tensor_names=("scale (Scale layer)", "bias (Scale layer)", "mean (blob 0 / blob 2)", "variance (blob 1 / blob 2)"),
        reestimate="run the TRAIN net over the data with moving_average_fraction 1 (a cumulative average) and save it",
    ),
    "tensorflow": Conventions(
        framework="tensorflow", display="TensorFlow", default_eps=1e-3, default_momentum=0.01, momentum_weights="new",
        momentum_name="exponential_avg_factor", stored_variance="unbiased",
        inference_mode="is_training=false on FusedBatchNorm: call the Keras model with training=False, or set trainable=False "
        "on its BatchNormalization layers, before saving or exporting",
        tensor_names=("gamma (scale)", "beta (offset)", "moving_mean (mean)", "moving_variance (variance)"),
        reestimate="run the BatchNormalization layers in training mode over the data with momentum near 0 and save again, "
        "never on one small batch",
    ),
}


def conventions(framework: str) -> Conventions:
    """The row for a framework; unknown frameworks get PyTorch's (the most common source)."""
    return CONVENTIONS.get(framework, CONVENTIONS["torch"])

"""The first wall before TensorFlow runs a SavedModel: every op is vetted, from the file's bytes.

TensorFlow's own security policy says running an untrusted graph is running untrusted code:
a graph can read and write files (ReadFile, WriteFile, SaveV2 to any path), map files into
memory (ImmutableConst), call Python registered in the process (PyFunc) and, through TF1's
init/main ops, run any of these at load time. So before `tf.saved_model.load`, and before
TensorFlow is even imported, every node of every MetaGraph (the graph and its whole function
library) is read with bnlint's own protobuf reader and its op checked against an allowlist of
pure tensor arithmetic, shape manipulation, variables and control flow:

- ops the serving signature reaches must be in `COMPUTE_OPS` (or be a library function, itself
  checked);
- ops it does not reach (the checkpoint save/restore functions every SavedModel carries, TF1
  restore and init ops) may also be the checkpoint ops in `CHECKPOINT_OPS`, which only read and
  write tensor bundles;
- anything else needs --trust, and the refusal names the ops and where they are.

This is the first wall only: the run itself is in the isolated child (bnlint.sandbox), where a
checkpoint op writing outside the child's private folder, or reading outside the model's, is
denied by Landlock. Torch-free and TensorFlow-free.
"""

from __future__ import annotations

from pathlib import Path

from bnlint.errors import InputError, TrustRequired
from bnlint.loaders.tf_proto import MetaGraph, read_saved_model
from bnlint.protowire import WireError

_STRUCTURE = {
    "Const", "Placeholder", "PlaceholderWithDefault", "Identity", "IdentityN", "NoOp", "StopGradient",
    "PreventGradient", "Snapshot", "EnsureShape", "CheckNumerics", "CheckNumericsV2", "Assert",
    "StatefulPartitionedCall", "PartitionedCall",
}
_VARIABLES = {
    "VarHandleOp", "ReadVariableOp", "VarIsInitializedOp", "DisableCopyOnRead", "DestroyResourceOp",
    "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "ResourceGather",
    "VariableV2", "Variable", "Assign", "AssignAdd", "AssignSub", "IsVariableInitialized",
}
_CONTROL_FLOW = {
    "If", "StatelessIf", "While", "StatelessWhile", "Case", "StatelessCase",
    "Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond", "RefSwitch", "RefEnter", "RefIdentity",
}
_ELEMENTWISE = {
    "Add", "AddV2", "AddN", "Sub", "Mul", "MulNoNan", "Div", "DivNoNan", "RealDiv", "FloorDiv", "FloorMod",
    "TruncateDiv", "TruncateMod", "Mod", "Maximum", "Minimum", "Neg", "Abs", "Sign", "Square", "SquaredDifference",
    "Sqrt", "Rsqrt", "Reciprocal", "Inv", "Exp", "Expm1", "Log", "Log1p", "Pow", "Tanh", "Sigmoid", "Erf", "Erfc",
    "Sin", "Cos", "Tan", "Atan", "Atan2", "Floor", "Ceil", "Round", "Rint", "ClipByValue", "IsNan", "IsInf",
    "IsFinite", "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Equal", "NotEqual", "Less",
    "LessEqual", "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr", "LogicalNot", "Select", "SelectV2", "Cast",
    "Bitcast", "BiasAdd", "BiasAddV1", "ZerosLike", "OnesLike",
}
_NETWORK = {
    "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D", "Conv3D", "Conv2DBackpropInput",
    "Conv3DBackpropInputV2", "DepthwiseConv2dNative", "_FusedConv2D", "_FusedMatMul", "_FusedDepthwiseConv2dNative",
    "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "_FusedBatchNormEx", "MaxPool", "MaxPoolV2",
    "MaxPool3D", "AvgPool", "AvgPool3D", "Softmax", "LogSoftmax", "LRN", "ResizeBilinear", "ResizeNearestNeighbor",
    "ResizeBicubic", "ResizeArea", "DepthToSpace", "SpaceToDepth", "SpaceToBatchND", "BatchToSpaceND",
}
_REDUCE_AND_SHAPE = {
    "Mean", "Sum", "Prod", "Max", "Min", "ArgMax", "ArgMin", "All", "Any", "Cumsum", "Cumprod", "TopKV2",
    "Reshape", "Squeeze", "ExpandDims", "Transpose", "ConcatV2", "Concat", "Pack", "Unpack", "Split", "SplitV",
    "Slice", "StridedSlice", "Pad", "PadV2", "MirrorPad", "Tile", "Shape", "ShapeN", "Size", "Rank", "Fill", "Range",
    "Where", "GatherV2", "Gather", "GatherNd", "OneHot", "ReverseV2", "BroadcastTo", "BroadcastArgs",
    "BroadcastGradientArgs", "Const",
}
_RANDOM = {  # dropout and noise layers in training graphs: numbers, no I/O
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal", "StatelessRandomUniformV2",
    "StatelessRandomNormalV2", "StatelessRandomGetKeyCounter", "StatelessRandomGetAlg", "StatelessRandomUniform",
    "StatelessRandomNormal",
}
_STRINGS = {"StringJoin", "StaticRegexFullMatch", "ShardedFilename"}  # checkpoint paths: pure string arithmetic

COMPUTE_OPS = frozenset(_STRUCTURE | _VARIABLES | _CONTROL_FLOW | _ELEMENTWISE | _NETWORK | _REDUCE_AND_SHAPE | _RANDOM | _STRINGS)
# Read or write tensor bundles (the SavedModel's own variables): allowed only off the serving path.
CHECKPOINT_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "SaveSlices", "Save", "Restore", "RestoreSlice"})

MAX_NAMED = 5


def unvetted_ops(metas: list[MetaGraph], signature_outputs: list[str]) -> dict[str, list[str]]:
    """op -> where it occurs ("graph" or "function NAME"), for every op outside the allowlists."""
    from bnlint.loaders.tf_savedmodel import _Tracer

    found: dict[str, list[str]] = {}
    roots = [name.lstrip("^").split(":")[0] for name in signature_outputs]
    for meta in metas:
        tracer = _Tracer(meta)
        serving, serving_nodes = tracer.reachable(roots)
        library = set(tracer.functions)
        for node in meta.graph.nodes:
            allowed = COMPUTE_OPS if node.name in serving_nodes else COMPUTE_OPS | CHECKPOINT_OPS
            if node.op not in allowed and node.op not in library:
                found.setdefault(node.op, []).append(f"graph node {node.name!r}")
        for function in meta.graph.functions:
            allowed = COMPUTE_OPS if function.name in serving else COMPUTE_OPS | CHECKPOINT_OPS
            for node in function.nodes:
                if node.op not in allowed and node.op not in library:
                    found.setdefault(node.op, []).append(f"function {function.name!r}")
    return found


def vet_savedmodel(path: str, trust: bool) -> None:
    """Raise TrustRequired naming the ops a run of this SavedModel would need --trust for."""
    if trust:
        return
    from bnlint.loaders.tf_savedmodel import _open, _signature_outputs

    _, buf = _open(Path(path))  # size-checked; InputError (one line) when unreadable
    try:
        found = unvetted_ops(read_saved_model(buf), _signature_outputs(buf))
    except (WireError, RecursionError) as exc:
        raise InputError(path, f"not a valid SavedModel ({exc})") from None
    if found:
        ops = sorted(found)
        named = ", ".join(f"{op} ({found[op][0]})" for op in ops[:MAX_NAMED]) + (f" and {len(ops) - MAX_NAMED} more" if len(ops) > MAX_NAMED else "")
        raise TrustRequired(path, f"running this SavedModel would run TensorFlow ops bnlint does not vet: {named}; "
                                  "graphs can read and write files, so pass --trust to run it (still in the isolated child) "
                                  "if you trust the file")

"""Match saved Keras weights to layers, by the rules Keras itself uses, never by guessing.

Keras 3 files (`.keras`, `*.weights.h5`): each layer's variables sit in the group
`saving_lib._save_state` gives it: a model's layers under `<model group>/layers/<snake_case class
name>`, with `_1`, `_2`, ... for the second, third, ... layer of the same class in that model
(`_save_container_state` + `_get_unique_name`; `naming.to_snake_case` of the class name, never
`config.name`); a nested model's group nests the same way; a Sequential's leading InputLayer is
not in `Sequential.layers` and takes no slot. Variables are `vars/0..n-1` in
`save_own_variables` order. Keras loads BY PATH (`saving_lib._load_container_state` ->
`H5IOStore.get(path)`; a missing group gives an empty store and `Layer._check_load_own_variables`
refuses the count): the `name` attribute recent Keras 3 writes on each `vars` group is metadata
that loading never reads, so bnlint reads the path too and only notes a disagreeing label.

Legacy files (keras/src/legacy/saving/legacy_h5_format.py, `load_weights_from_hdf5_group`): the
datasets of a top-level layer's group are read in `weight_names` order and assigned BY POSITION
to `layer.trainable_weights + layer.non_trainable_weights` (BatchNormalization: gamma, beta,
moving_mean, moving_variance; no gamma with scale=False, no beta with center=False); the names
themselves are never compared. bnlint assigns a BatchNormalization layer's roles the same way,
by position among the names that belong to it (for a top-level BN layer: every name in its
group). A nested model keeps all its layers' weights in the top-level group, trainable ones
first; which names belong to which inner layer is decided by name (`<layer>/<variable>[:0]`,
Keras 1: `<layer>_<variable>`), then roles by position within the layer.

What Keras would refuse to load or bnlint cannot read as numbers (a missing or non-numeric
dataset, a wrong count, a name listed twice) is recorded on the BatchNorm layer as an
`UnreadableTensor` with its reason (BNLayer.unchecked, BN110), never dropped silently.
"""

from __future__ import annotations

import re
from typing import Any

from bnlint.loaders import keras_h5 as kh
from bnlint.loaders.keras_config import (
    NAME_ROLES,
    RENORM_ROLES,
    ConfigLayer,
    bn_roles_by_index,
    norm_kind,
    to_snake_case,
)
from bnlint.model import TensorRef

UNCHECKED = "!unchecked"  # Weights keys starting so hold an UnreadableTensor: a reason, not a variable

Weights = dict[str, TensorRef]

# Snake-case group names of weights-only Keras 3 files -> class names we can name with certainty.
_KNOWN_CLASSES = (
    "BatchNormalization", "SyncBatchNormalization", "LayerNormalization", "GroupNormalization", "Normalization",
    "UnitNormalization", "SpectralNormalization", "RMSNormalization", "Sequential", "Functional", "InputLayer",
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "DepthwiseConv2D",
    "SeparableConv2D", "Dense", "EinsumDense", "Embedding", "TimeDistributed",
)
SNAKE_CLASSES = {to_snake_case(name): name for name in _KNOWN_CLASSES}
_SUFFIX = re.compile(r"_\d+$")
_TF_SUFFIX = re.compile(r":\d+$")


# ----------------------------------------------------------------------------- Keras 3
def mark_unchecked(weights: Weights, reason: str) -> None:
    """Record why a BatchNorm layer's statistics cannot be checked as Keras would load them."""
    weights[f"{UNCHECKED}{len([k for k in weights if k.startswith(UNCHECKED)])}"] = kh.UnreadableTensor(reason)


def _bn_slot(role: str, found: kh.H5Tensor | str) -> TensorRef:
    return found if isinstance(found, kh.H5Tensor) else kh.UnreadableTensor(f"{role}: {found}")


def _numeric(tensors: list[kh.H5Tensor | str]) -> Weights:
    return {str(i): t for i, t in enumerate(tensors) if isinstance(t, kh.H5Tensor)}


def _v3_map(node: ConfigLayer, group: str, tensors: list[kh.H5Tensor | str], contiguous: bool) -> Weights:
    """Keys for a layer's vars: BN roles by index from center/scale(/renorm), as
    `Layer.load_own_variables` assigns them; other layers by index."""
    if norm_kind(node.class_name) != "bn":
        return _numeric(tensors)
    roles = bn_roles_by_index(node.config)
    weights: Weights = {}
    if not contiguous or len(tensors) != len(roles):
        mark_unchecked(weights, f"{group}/vars holds {len(tensors)} variables{'' if contiguous else ' (indices not 0..n-1)'} "
                       f"where Keras expects {len(roles)} (scale={node.config.get('scale', True)}, "
                       f"center={node.config.get('center', True)}): Keras refuses to load this layer")
        return weights
    return {role: _bn_slot(role, found) for role, found in zip(roles, tensors)}


def attach_v3(owner: kh.H5Owner, nodes: list[ConfigLayer], notes: list[str]) -> list[tuple[ConfigLayer, Weights]]:
    """Weights of a Keras 3 file, matched to the layers of its config by group path, as Keras loads them."""
    result: list[tuple[ConfigLayer, Weights]] = []
    used: dict[int, str] = {}  # id(node) -> the group its weights came from
    for node in nodes:
        group = node.v3_group
        found = kh.v3_vars(owner, group) if group else None
        if found is None and group and "_layer_checkpoint_dependencies" in owner.file:
            # .keras files from tf.keras 2.13 name a model's layers so (H5IOStore.get does the same)
            group = group.replace("layers", "_layer_checkpoint_dependencies")
            found = kh.v3_vars(owner, group)
        name_attr = found[1] if found else None
        if found is not None and name_attr is not None and name_attr != node.name:
            notes.append(f"{node.path}: the weights group {group} is labelled {name_attr!r}; Keras loads by path and "
                         "ignores the label, and so does bnlint")
        if found is None or group is None:
            weights: Weights = {}
            if norm_kind(node.class_name) == "bn" and not node.is_container:
                mark_unchecked(weights, f"no weights group at {group or '(none predicted)'}, where Keras looks for "
                               "this layer's variables: Keras refuses to load it")
            elif norm_kind(node.class_name) != "other" and not node.is_container:
                notes.append(f"{node.path}: no weights group for this {node.class_name} layer (expected {group})")
            result.append((node, weights))
            continue
        result.append((node, _v3_map(node, group, found[0], found[2])))
        used[id(node)] = group
    return _with_inner_layers(owner, result, used, notes)


def _with_inner_layers(owner: kh.H5Owner, pairs: list[tuple[ConfigLayer, Weights]], used: dict[int, str],
                       notes: list[str]) -> list[tuple[ConfigLayer, Weights]]:
    """A custom layer's own sublayers (`self.bn = BatchNormalization()`) are not in the config,
    only in the weights file, under attribute-named groups: list them right after their layer."""
    claimed = set(used.values())
    result: list[tuple[ConfigLayer, Weights]] = []
    for node, weights in pairs:
        result.append((node, weights))
        group = used.get(id(node))
        if group is None or node.is_container:
            continue
        inner = discover_v3(owner, notes, group, node.path, skip=claimed)
        if inner:
            notes.append(f"{node.path}: {len(inner)} sublayer(s) found in the weights file only (not in the config)")
        result += inner
    for order, (node, _) in enumerate(result):
        node.order = order
    return result


def _bn_by_count(tensors: list[kh.H5Tensor | str], path: str, notes: list[str]) -> Weights:
    """A BatchNormalization group with no config: the roles follow from the number of variables
    except for the first one when there are 3 or 6 (gamma or beta, which one is unknowable)."""
    tails: dict[int, list[str | None]] = {2: [], 3: [None], 4: ["gamma", "beta"], 5: [], 6: [None], 7: ["gamma", "beta"]}
    if len(tensors) not in tails:
        weights = _numeric(tensors)
        mark_unchecked(weights, f"{len(tensors)} variables do not fit a BatchNormalization (2 to 7)")
        return weights
    roles: list[str | None] = tails[len(tensors)] + ["moving_mean", "moving_variance"]
    if len(tensors) >= 5:
        roles += list(RENORM_ROLES)
    if None in roles:
        notes.append(f"{path}: without a config the first of its {len(tensors)} variables may be gamma or beta; "
                     "left under key '0'")
    return {role or str(i): _bn_slot(role or str(i), t) for i, (role, t) in enumerate(zip(roles, tensors))}


def discover_v3(owner: kh.H5Owner, notes: list[str], root: str = "", root_name: str = "",
                skip: frozenset[str] | set[str] = frozenset()) -> list[tuple[ConfigLayer, Weights]]:
    """A Keras 3 weights-only file (or a subclassed model's): classes from the group names that
    Keras derives from them (`layers/batch_normalization_3`). Groups named after an attribute
    (a subclassed model's `self.bn`) say nothing about their class; a Keras auto-generated layer
    name in the vars `name` attribute (`batch_normalization_2`) is then the only hint, and noted."""
    result: list[tuple[ConfigLayer, Weights]] = []
    for order, (group, name_path, parent, name_attr, by_class) in enumerate(kh.v3_groups(owner, root, root_name, skip)):
        key = group.rsplit("/", 1)[-1]
        class_name = SNAKE_CLASSES.get(_SUFFIX.sub("", key), SNAKE_CLASSES.get(key, "")) if by_class else ""
        if not class_name and name_attr:
            class_name = SNAKE_CLASSES.get(_SUFFIX.sub("", name_attr), "")
            if class_name:
                notes.append(f"{name_path}: class {class_name} inferred from its auto-generated layer name")
        name = name_path.rsplit("/", 1)[-1]
        node = ConfigLayer(name_path, name, class_name, None, {}, None, parent, order, [], group, name_path.split("/")[0])
        found = kh.v3_vars(owner, group)
        tensors = found[0] if found else []
        weights: Weights
        if norm_kind(class_name) == "bn":
            weights = _bn_by_count(tensors, name_path, notes)
        else:
            weights = _numeric(tensors)
            shapes = {t.shape for t in weights.values()}
            if not class_name and 2 <= len(weights) <= 7 and len(shapes) == 1 and len(next(iter(shapes))) == 1:
                notes.append(f"{name_path}: {len(tensors)} vectors of one shape, like a BatchNormalization's, but "
                             "the file does not record its class: not treated as BatchNorm")
        result.append((node, weights))
    if not root and not any(norm_kind(node.class_name) == "bn" for node, _ in result):
        notes.append("no weights group is named like a BatchNormalization layer (batch_normalization[_N]); "
                     "without a config, BatchNorm layers under other class names or names cannot be identified")
    return result


# ----------------------------------------------------------------------------- legacy
def split_weight_name(name: str) -> tuple[list[str], str]:
    """'backbone/bn1/moving_variance:0' -> (['backbone', 'bn1'], 'moving_variance')."""
    parts = _TF_SUFFIX.sub("", name).split("/")
    return parts[:-1], parts[-1]


_KERAS1_NOTE = ("Keras 1 names: running_std is read as moving_variance (Keras 1.1+ kept the variance there and "
                "Keras 2 loads it unchanged); files from Keras 1.0.x kept the standard deviation")


def _note_keras1(var: str, notes: list[str]) -> None:
    if var == "running_std" and _KERAS1_NOTE not in notes:
        notes.append(_KERAS1_NOTE)


def _role(var: str, is_bn: bool) -> str:
    """The key for a legacy variable: BN roles (TF may add _1 on re-created names), else the name."""
    if not is_bn:
        return var
    return NAME_ROLES.get(var) or NAME_ROLES.get(_SUFFIX.sub("", var)) or var


def _owner_node(top: ConfigLayer, subtree: list[ConfigLayer], name: str) -> tuple[ConfigLayer | None, str]:
    """Which layer of a top-level layer's subtree a legacy weight name belongs to, and its variable."""
    parts, var = split_weight_name(name)
    leaves = [n for n in subtree if not n.is_container and n is not top] or [top]
    if len(leaves) == 1:
        if not parts:  # Keras 1: '<layer>_<variable>'
            prefix = f"{leaves[0].name}_"
            var = var.removeprefix(prefix)
        return leaves[0], var
    if not parts:
        matches = [n for n in leaves if var.startswith(f"{n.name}_")]
        longest = max(matches, key=lambda n: len(n.name), default=None)
        return longest, (var[len(longest.name) + 1:] if longest else var)
    scored = [(n, _suffix_score(n.path.split("/"), parts)) for n in leaves if n.name == parts[-1]]
    if not scored:
        return None, var
    best_score = max(score for _, score in scored)
    best = [n for n, score in scored if score == best_score]
    return (best[0] if len(best) == 1 else None), var


def _suffix_score(path: list[str], parts: list[str]) -> int:
    score = 0
    for a, b in zip(reversed(path), reversed(parts)):
        if a != b:
            break
        score += 1
    return score


def _legacy_bn(node: ConfigLayer, items: list[tuple[str, str, kh.H5Tensor | str]], notes: list[str]) -> Weights:
    """A BatchNormalization layer's legacy weights, BY POSITION in `weight_names` order as Keras's
    `load_weights_from_hdf5_group` assigns them (names are never compared); `items` are
    (weight name, variable name, tensor or why not) in that order."""
    roles = bn_roles_by_index({**node.config, "renorm": False})
    weights: Weights = {}
    names = [name for name, _, _ in items]
    for twice in sorted({name for name in names if names.count(name) > 1}):
        mark_unchecked(weights, f"weight_names lists {twice!r} {names.count(twice)} times")
    renorm = node.config.get("renorm") is True
    if len(items) < len(roles) or (len(items) > len(roles) and not renorm):
        mark_unchecked(weights, f"weight_names lists {len(items)} weights where Keras expects {len(roles)} "
                       f"(scale={node.config.get('scale', True)}, center={node.config.get('center', True)}): "
                       "Keras refuses to load this layer")
        return weights
    for index, (role, (name, var, found)) in enumerate(zip(roles, items)):
        _note_keras1(var, notes)
        named = _role(var, True)
        if named != role and named in NAME_ROLES.values():
            notes.append(f"{node.path}: weight_names[{index}] is {name!r}, but Keras assigns by position: it is loaded as {role}")
        weights[role] = _bn_slot(role, found)
    for _name, var, found in items[len(roles):]:  # tf.keras 2 renorm's extra variables, after the four
        if isinstance(found, kh.H5Tensor):
            weights.setdefault(_role(var, True), found)
    return weights


def attach_legacy(owner: kh.H5Owner, root: Any, nodes: list[ConfigLayer], notes: list[str]) -> list[tuple[ConfigLayer, Weights]]:
    """Weights of a legacy full-model .h5, matched to the layers of its model_config: to a
    top-level layer by its group, inside a nested model by name, BN roles by position."""
    weights: dict[int, Weights] = {id(n): {} for n in nodes}
    tops = {n.name: n for n in nodes if n.parent == ""}
    for top_name, entries in kh.legacy_groups(owner, root):
        top = tops.get(top_name)
        if top is None:
            if entries:
                notes.append(f"weights group {top_name!r} matches no top-level layer of the config; ignored")
            continue
        subtree = [n for n in nodes if n.top_name == top_name]
        owned: dict[int, tuple[ConfigLayer, list[tuple[str, str, kh.H5Tensor | str]]]] = {}
        for weight_name, found in entries:
            node, var = _owner_node(top, subtree, weight_name)
            if node is None:
                notes.append(f"{top_name}: weight {weight_name!r} matches no single layer; ignored")
                continue
            owned.setdefault(id(node), (node, []))[1].append((weight_name, var, found))
        for node, items in owned.values():
            if norm_kind(node.class_name) == "bn":
                weights[id(node)] = _legacy_bn(node, items, notes)
                continue
            for weight_name, var, found in items:
                if not isinstance(found, kh.H5Tensor):
                    notes.append(f"{top_name}: weight {weight_name!r} has no numeric dataset ({found}); ignored")
                    continue
                _note_keras1(var, notes)
                if var in weights[id(node)]:
                    notes.append(f"{node.path}: two weights map to {var!r}; kept the first")
                    continue
                weights[id(node)][var] = found
    return [(n, weights[id(n)]) for n in nodes]


def discover_legacy(owner: kh.H5Owner, root: Any, notes: list[str]) -> list[tuple[ConfigLayer, Weights]]:
    """Legacy weights-only file: layers found from weight names alone (like a bare state dict).
    A layer is BatchNorm when it has both moving statistics (`moving_mean` and `moving_variance`,
    or Keras 1's `running_mean` and `running_std`). Without a config there is no model to assign
    positions to, so roles come from the names; a statistic that is not numbers or is listed
    twice still leaves the layer unchecked."""
    clusters: dict[str, list[tuple[str, str, kh.H5Tensor | str]]] = {}
    for top, entries in kh.legacy_groups(owner, root):
        scopes = {tuple(split_weight_name(name)[0]) for name, _ in entries}
        for name, found in entries:
            parts, var = split_weight_name(name)
            if len(scopes) <= 1:
                path = top  # one layer; its variable scope may differ from the group name (TF renames)
                if not parts and var.startswith(f"{top}_"):
                    var = var[len(top) + 1:]
            else:
                path = "/".join(parts if parts[:1] == [top] else [top, *parts])
            clusters.setdefault(path, []).append((name, var, found))
            _note_keras1(var, notes)
    result: list[tuple[ConfigLayer, Weights]] = []
    for order, (path, variables) in enumerate(clusters.items()):
        names = {var for _, var, _ in variables}
        is_bn = {"moving_mean", "moving_variance"} <= names or {"running_mean", "running_std"} <= names
        parent, _, layer_name = path.rpartition("/")
        node = ConfigLayer(path, layer_name, "BatchNormalization" if is_bn else "", None, {}, None, parent, order, [], None,
                           path.split("/")[0])
        weights: Weights = {}
        for name, var, found in variables:
            role = _role(var, is_bn)
            if not isinstance(found, kh.H5Tensor):
                if is_bn and role in NAME_ROLES.values():
                    mark_unchecked(weights, f"{role}: {found}")
                else:
                    notes.append(f"{path}: weight {name!r} has no numeric dataset; ignored")
            elif role in weights:
                if is_bn:
                    mark_unchecked(weights, f"two weights map to {role} ({name!r} and an earlier one)")
            else:
                weights[role] = found
        result.append((node, weights))
    if any(node.class_name for node, _ in result):
        notes.append("weights-only file: BatchNormalization layers identified by their variable names; "
                     "epsilon, momentum, axis and trainable are not recorded")
    return result

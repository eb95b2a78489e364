"""The model's state_dict as numpy arrays, for loading into a user's architecture (dynamic analysis).

Read with the same safe readers as linting (nothing from the file is executed). Keys are as stored
(a checkpoint wrapper is unwrapped; Lightning keys keep their `model.`-style prefix); bfloat16
tensors come back as float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bnlint.errors import InputError
from bnlint.loaders import sniff
from bnlint.loaders.torch_objects import Extracted


def extract(path: Path) -> Extracted:
    """Tensors (lazy) and module tree of a torch or safetensors file."""
    kind = sniff(path)
    if kind == "zip":
        from bnlint.loaders.torch_zip import extract_torch_zip

        return extract_torch_zip(path)
    if kind == "pickle":
        from bnlint.loaders.torch_legacy import extract_torch_legacy

        return extract_torch_legacy(path)
    if kind == "safetensors":
        from bnlint.loaders.safetensors_file import extract_safetensors

        return extract_safetensors(path)
    raise InputError(str(path), "an ONNX file has no PyTorch state_dict to load")


def state_dict_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of the model's state_dict, read now, as numpy arrays keyed as stored."""
    extracted = extract(Path(path))
    if not extracted.tensors:
        raise InputError(str(path), "no tensors found in the file")
    return {key: ref.numpy() for key, ref in extracted.tensors.items()}

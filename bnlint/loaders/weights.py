"""The model's state_dict as numpy arrays, for loading into a user's architecture (dynamic analysis).

Read with the same safe readers as linting (nothing from the file is executed). Keys are as stored
(a checkpoint wrapper is unwrapped; Lightning keys keep their `model.`-style prefix); bfloat16
tensors come back as float32.
"""

from __future__ import annotations

import os

import numpy as np

from bnlint.errors import InputError
from bnlint.loaders import extract


def state_dict_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of the model's state_dict, read now, as numpy arrays keyed as stored."""
    extracted = extract(path)
    if not extracted.tensors:
        raise InputError(str(path), "no tensors found in the file")
    return {key: ref.numpy() for key, ref in extracted.tensors.items()}

"""Reads tensors from a Hugging Face directory: one ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Every tensor is checked by name and shape, so a bad
checkpoint fails with a message naming the tensor, not deep inside the model."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from afdserve.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that does not match its config (missing tensor, wrong shape, no files)."""


class Checkpoint:
    """Name -> shard index of a checkpoint directory, with checked reads."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.model_dir, self.dtype, self.device = model_dir, dtype, device
        self.file_of = _index(model_dir)
        self._handles: dict[str, object] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor ``name``, checked against ``shape``, cast to the engine's dtype."""
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"checkpoint {self.model_dir!r} is missing tensor {name!r}")
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(os.path.join(self.model_dir, file), "pt")
        found = tuple(handle.get_slice(name).get_shape())
        if found != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(found)}, expected {list(shape)} "
                                  f"from config.json")
        return handle.get_tensor(name).to(device=self.device, dtype=self.dtype)

    def close(self) -> None:
        self._handles.clear()


def _index(model_dir: str) -> dict[str, str]:
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        for file in set(weight_map.values()):
            if not os.path.isfile(os.path.join(model_dir, file)):
                raise CheckpointError(f"shard {file!r} listed in {index_path} is missing")
        return weight_map
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir!r}")
    with safe_open(single, "pt") as f:
        return {name: "model.safetensors" for name in f.keys()}

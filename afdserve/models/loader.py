"""Reads tensors from a Hugging Face directory: one ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Every tensor is checked by name and shape, so a bad
checkpoint fails with a message naming the tensor, not deep inside the model."""

from __future__ import annotations

import json
import os
import zlib

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


class DummyCheckpoint:
    """``--load-format dummy``: random weights of the requested shapes, made on the device
    (benchmarks at real model shapes without a download). Norm weights are 1, biases 0,
    matrices N(0, 1/fan_in) so activations stay O(1)."""

    def __init__(self, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0):
        self.dtype, self.device, self.seed = dtype, device, seed
        self.gen = torch.Generator(device=device)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Seeded by the tensor's name, so every process draws the same weights in any order."""
        self.gen.manual_seed((self.seed << 32) ^ zlib.crc32(name.encode()))
        if len(shape) == 1:
            fill = 1.0 if name.endswith("norm.weight") else 0.0
            return torch.full(shape, fill, dtype=self.dtype, device=self.device)
        std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32) * std
        return t.to(self.dtype)

    def close(self) -> None:
        pass


def open_checkpoint(model_dir: str, load_format: str, dtype: torch.dtype, device, seed: int = 0):
    """The checkpoint reader of a load format: safetensors files, or dummy random weights."""
    if load_format == "dummy":
        return DummyCheckpoint(dtype, device, seed)
    return Checkpoint(model_dir, dtype, device)


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

"""A Hugging Face checkpoint folder: which shard holds which tensor, checked on access."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import EngineError
from .safetensors_file import SafetensorsFile, TensorInfo


class Checkpoint:
    """Tensors of a folder of *.safetensors shards (with or without model.safetensors.index.json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shard_names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise EngineError(f"{index}: not a valid safetensors index ({e})") from None
            for shard in shard_names:
                path = self.folder / shard
                if not path.exists():
                    raise EngineError(f"{index}: names shard {shard}, which does not exist")
                self.files[shard] = SafetensorsFile(path)
            for name, shard in weight_map.items():
                if name not in self.files[shard].tensors:
                    raise EngineError(f"{self.folder / shard}: tensor {name} listed in the index is missing")
                self.where[name] = self.files[shard]
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise EngineError(f"{self.folder}: no *.safetensors files")
            for path in shards:
                st = SafetensorsFile(path)
                self.files[path.name] = st
                for name in st.tensors:
                    self.where[name] = st

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """The tensor's header entry, its presence and shape checked."""
        st = self.where.get(name)
        if st is None:
            raise EngineError(f"{self.folder}: missing tensor {name}")
        info = st.tensors[name]
        if shape is not None and tuple(info.logical_shape) != tuple(shape):
            held = f" ({info.fmt} blocks)" if info.quant else ""
            raise EngineError(
                f"{st.path}: tensor {name} has shape {list(info.logical_shape)}{held}, expected {list(shape)}")
        if info.fmt is None:
            raise EngineError(f"{st.path}: tensor {name} has dtype {info.dtype}; weights must be F32, F16 or BF16 "
                              f"(or U8 blocks marked in the metadata by mer-tui convert)")
        return info

    def path_of(self, name: str) -> Path:
        return self.where[name].path

    def read(self, name: str, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, str]:
        """(array in its storage dtype, kernels format name) after checking the shape (the logical
        (rows, cols) shape: a block-quantized tensor's array is uint8 (rows, row_bytes))."""
        info = self.info(name, shape)
        return self.where[name].read(name), info.fmt  # type: ignore[return-value]

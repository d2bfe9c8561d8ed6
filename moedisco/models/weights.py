"""A model's weights on disk as safetensors: one file, or size-capped files with an index, read a tensor at a time.

    save_weights(model, OUTPUT / "source")                  # config.json + model.safetensors
    with SavedWeights(OUTPUT / "merged") as weights:        # one tensor in memory at a time, whatever the layout
        router = weights.get("model.layers.0.mlp.gate.weight")
    writer = WeightsWriter(OUTPUT / "merged", max_file_bytes=2 << 30); writer.add(name, tensor); writer.close()

Both layouts are the ones `save_pretrained` writes, so every folder here loads with `from_pretrained`.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from moedisco.io.atomic import write_atomically
from moedisco.models.architecture import read_config

WEIGHTS_FILE = "model.safetensors"



def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied duplicates dropped (safetensors refuses shared storage) and tensors made contiguous."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous().cpu()
    return state



def save_weights(model: PreTrainedModel, folder: Path) -> None:
    """config.json + model.safetensors with the model's own (runtime) tensor names; loads with from_pretrained."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file(unique_state_dict(model), folder / WEIGHTS_FILE, metadata={"format": "pt"})


INDEX_FILE = "model.safetensors.index.json"



def files_of(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `folder` that holds it (one file, or the shards of an index)."""
    index = folder / INDEX_FILE
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as handle:
        return {name: folder / WEIGHTS_FILE for name in handle.keys()}



class SavedWeights:
    """Reads single tensors, or every tensor under a prefix, of a saved model folder (a context manager)."""

    def __init__(self, folder: Path):
        self.folder, self.config = folder, read_config(folder)
        self.files = files_of(folder)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> SavedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise KeyError(f"{name} is not in {self.folder}")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path].get_tensor(name)

    def under(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor named `prefix` + rest, keyed by rest, floating ones in fp32 (as `finetune.load_moe`)."""
        return {name[len(prefix):]: fp32(self.get(name)) for name in self.files if name.startswith(prefix)}



def fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


class WeightsWriter:
    """Collects tensors and writes a safetensors file whenever `max_file_bytes` is reached."""

    def __init__(self, out: Path, max_file_bytes: int):
        self.out, self.max_file_bytes = out, max_file_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_file_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.out / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards as `save_pretrained` does and write the index when there is more than one."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            (self.out / "shard-00000.tmp").rename(self.out / WEIGHTS_FILE)
            return
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.out / f"shard-{index:05d}.tmp").rename(self.out / final)
            weight_map.update({name: final for name in names})
        index_payload = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        write_atomically(self.out / INDEX_FILE, json.dumps(index_payload, indent=2))

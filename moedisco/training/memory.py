"""The memory measures of `TrainConfig` applied to a model, the device it trains on, and the peak-memory meter.

    device = resolve_device(cfg.device)                  # `auto`: CUDA when there is one
    model = prepare_model(model, cfg, device)            # bf16 weights (bf16-true), activation checkpointing
    meter = PeakMemory(device); ...; meter.peak_gb()     # the stage's peak memory

The optimizers the measures choose are `moedisco.training.optimizer`; the planner that chooses the measures is
`moedisco.planning.memory_plan`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from moedisco.config.spec import TrainConfig

GB = 1e9
MEASURES = ("micro_batch_size", "activation_checkpointing", "precision", "optimizer", "offload_optimizer")


def resolve_device(device: str) -> torch.device:
    """A config's `device` as a torch device: `auto` is CUDA when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def measures_of(cfg: TrainConfig) -> dict:
    """The memory measures a stage trains with, as its metrics and summary record them."""
    return {name: getattr(cfg, name) for name in MEASURES}


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16-true" else torch.float32


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 for bf16-mixed (and `auto` on CUDA); none for fp32 and bf16-true (already bf16)."""
    if cfg.precision == "bf16-mixed" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# glibc's malloc option number for the size from which an allocation gets pages of its own (`mallopt(3)`).
M_MMAP_THRESHOLD = -3
OWN_PAGES_FROM = 1 << 20  # bytes: every activation, gradient and weight of a real model is larger


@functools.cache
def return_freed_tensors_to_the_os() -> None:
    """Give every CPU tensor of 1 MB or more pages of its own, returned to the OS when it is freed (glibc only).

    By default glibc raises that threshold to the size of each such block freed (up to 32 MB), so after the first
    step the activations and gradients land in its heap, which keeps the freed blocks: measured at hidden 1024
    (`benchmarks/memory.py`), a CPU stage's resident peak was 1.63 GB with checkpointing against 1.17 GB with the
    threshold fixed, which is what its tensors need. Fixing it turns the dynamic raise off."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, OWN_PAGES_FROM)


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Move `model` to `device` in the weight dtype of `cfg.precision`; turn on activation checkpointing."""
    if device.type == "cpu":
        return_freed_tensors_to_the_os()
    model.to(device=device, dtype=weight_dtype(cfg))
    _keep_strictly_fp32(model)
    if cfg.activation_checkpointing:
        # Non-reentrant: works with frozen inputs (embeddings) and keyword arguments, and is what torch recommends.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _keep_strictly_fp32(model: torch.nn.Module) -> None:
    """Tensors the architecture declares fp32 whatever the weights' dtype (`_keep_in_fp32_modules_strict`, e.g.
    DeepSeek's expert bias, whose updates of 1e-3 vanish in bf16) are cast back after `.to(dtype)`, which casts
    every floating tensor; a checkpoint loaded into them afterwards keeps its fp32 values."""
    names = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    for module in model.modules():
        for name in names:
            tensor = module._buffers.get(name)
            if tensor is not None and tensor.is_floating_point():
                module._buffers[name] = tensor.float()
            elif isinstance(module._parameters.get(name), torch.nn.Parameter):
                module._parameters[name].data = module._parameters[name].data.float()


# --- the per-parameter AdamW with stored state ---------------------------------------------------------------


# --- peak memory ---------------------------------------------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith(field + ":")), None)
    return int(line.split()[1]) / 1024.0 if line else None


class PeakMemory:
    """The peak memory of one training stage, in GB.

    CUDA: `torch.cuda.max_memory_allocated` since the meter started (the peak statistics are reset then).
    CPU: the process's resident high-water mark (VmHWM) since the meter started, less its resident size then, so
    the interpreter and libraries already loaded are not charged to the stage; the mark is reset by writing 5 to
    /proc/self/clear_refs. Start it before the model is built. None where neither can be read (not Linux).
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline_mb = 0.0
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.baseline_mb = None
            return
        self.baseline_mb = _proc_status_mb("VmRSS")

    def peak_gb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GB
        high = _proc_status_mb("VmHWM")
        if high is None or self.baseline_mb is None:
            return None
        return max(0.0, high - self.baseline_mb) * 1e6 / GB

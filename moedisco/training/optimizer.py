"""The optimizers of `TrainConfig`'s measures, and the AdamW second moments a Fisher-weighted merge reads.

    optimizer = make_optimizer(model, cfg, lr_scale)     # AdamW, 8-bit AdamW, compensated bf16 AdamW, offload
    moment, step = second_moment(optimizer, param)       # fp32 AdamW second moment, whatever stores it
    moments = second_moments(model, optimizer)           # all of them, bias-corrected and gathered: the Fisher

fp32 and bf16-mixed weights train with `torch.optim.AdamW`, or bitsandbytes' `AdamW8bit` for `adamw-8bit` (it runs
on the CPU too). bf16-true weights, or `offload_optimizer`, train with `StoredAdamW`: torch's own AdamW update in
fp32, one parameter at a time, with the state stored between steps as the measures ask (bf16 or 8-bit moments, in
host memory when offloaded, and a bf16 Kahan compensation buffer for bf16 weights). On a sharded model
(`moedisco.training.fsdp`) it steps each rank's local shard; it also holds `adamw-8bit` there, because bitsandbytes'
fused update has no DTensor support.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw as adamw_update  # torch's functional AdamW, which `StoredAdamW` runs

from moedisco.config.spec import TrainConfig
from moedisco.training import fsdp

QUANT_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states



def parameter_groups(model: torch.nn.Module, cfg: TrainConfig,
                     lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """The trainable parameters by (weight decay, lr scale); `lr_scale(name)` 0 freezes a parameter."""
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        scale = lr_scale(name) if lr_scale else 1.0
        if scale == 0.0:
            param.requires_grad_(False)
        if not param.requires_grad:
            continue
        # No weight decay on norms and biases (1-D tensors), the usual practice for transformers.
        groups.setdefault((param.ndim >= 2, scale), []).append(param)
    return [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), params in groups.items()]



def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg` asks for over the trainable parameters (see the module docstring for which)."""
    groups = parameter_groups(model, cfg, lr_scale)
    eight_bit = cfg.optimizer == "adamw-8bit"
    # bitsandbytes' fused 8-bit update has no DTensor sharding rule, so a sharded model's 8-bit state is kept by
    # `StoredAdamW`, which steps each rank's local shard.
    sharded = any(isinstance(param, DTensor) for group in groups for param in group["params"])
    if cfg.precision == "bf16-true" or cfg.offload_optimizer or (eight_bit and sharded):
        return StoredAdamW(groups, lr=cfg.lr, betas=cfg.betas, state_bits=8 if eight_bit else 16,
                           offload=cfg.offload_optimizer)
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)



@functools.cache
def _quantisation_map(signed: bool, device: torch.device) -> torch.Tensor:
    """bitsandbytes' dynamic map, as its 8-bit AdamW uses it: signed for the first moment, unsigned for the second."""
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map(signed=signed).to(device)



def _quantize(value: torch.Tensor, signed: bool) -> dict:
    from bitsandbytes.functional import quantize_blockwise

    if value.numel() == 0:  # an FSDP2 shard of a tensor with fewer rows than ranks (a [1, hidden] gate) is empty
        return {"codes": value.to(torch.uint8), "absmax": value.new_zeros(0, dtype=torch.float32)}
    codes, state = quantize_blockwise(value.contiguous(), code=_quantisation_map(signed, value.device),
                                      blocksize=QUANT_BLOCK)
    return {"codes": codes, "absmax": state.absmax}



def _dequantize(packed: dict, signed: bool) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_blockwise

    codes = packed["codes"]
    if codes.numel() == 0:  # bitsandbytes' kernels are not launched on no blocks
        return codes.to(torch.float32)
    return dequantize_blockwise(codes, absmax=packed["absmax"], code=_quantisation_map(signed, codes.device),
                                blocksize=QUANT_BLOCK)



class StoredAdamW(torch.optim.Optimizer):
    """AdamW (torch's update, in fp32, one parameter at a time) whose state is stored compactly between steps:
    moments in bf16 (`state_bits` 16) or 8-bit block-wise (8), in host memory when `offload`, and for bf16
    weights a bf16 Kahan compensation buffer."""

    # Why compensation for bf16-true weights: a bf16 weight has 8 bits of mantissa, so an update below half its
    # spacing (2^-9 relative) rounds away, and at lr 1e-4 AdamW's updates are about 1e-4 relative. An fp32 master
    # copy would keep them for 4 more bytes per parameter, undoing most of what bf16 weights save. The buffer keeps
    # the last update's rounding error in bf16 and adds it to the next (Kahan summation; Zamirai et al. 2020,
    # "Revisiting BFloat16 Training"): about 16 bits of mantissa for 2 bytes per parameter, and deterministic, so a
    # resumed run continues exactly (stochastic rounding would draw random numbers a resume must replay).

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float = 1e-8, state_bits: int = 16,
                 offload: bool = False):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.state_bits, self.offload = state_bits, offload

    # Its state is per rank (each shard's 8-bit codes are quantised in blocks of that shard), not per parameter:
    # `moedisco.training.fsdp` saves it rank by rank rather than through torch.distributed.checkpoint.
    state_is_local = True

    def _home(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.offload else param.device

    def _pack(self, value: torch.Tensor, param: torch.Tensor, signed: bool):
        value = value.to(self._home(param))
        return _quantize(value, signed) if self.state_bits == 8 else value.to(torch.bfloat16)

    def _unpack(self, stored, param: torch.Tensor, signed: bool) -> torch.Tensor:
        value = _dequantize(stored, signed) if isinstance(stored, dict) else stored
        return value.to(device=param.device, dtype=torch.float32).view_as(param)

    def moment(self, param: torch.Tensor) -> torch.Tensor | None:
        """The fp32 second moment of `param` (dequantised from 8 bits where stored so), None before a step; a
        DTensor sharded as `param` is when `param` is one (`moedisco.training.fsdp.full_tensor` gathers it)."""
        state = self.state.get(param)
        if not state:
            return None
        value = self._unpack(state["exp_avg_sq"], _local(param), signed=False)
        if isinstance(param, DTensor):
            return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())
        return value

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_one(param, group)

    def _step_one(self, sharded_param: torch.Tensor, group: dict) -> None:
        # The update is elementwise, so on a sharded (DTensor) parameter each rank steps its own shard as a plain
        # tensor (bitsandbytes' quantiser takes no DTensor); the shard is a view of the parameter's storage.
        state, param, grad = self.state[sharded_param], _local(sharded_param), _local(sharded_param.grad)
        if not state:
            zeros = torch.zeros_like(param, dtype=torch.float32)
            state.update(step=torch.tensor(0.0), exp_avg=self._pack(zeros, param, True),
                         exp_avg_sq=self._pack(zeros, param, False))
            if param.dtype != torch.float32:
                state["compensation"] = torch.zeros_like(param, device=self._home(param))
        master = param.float()
        if "compensation" in state:
            master += state["compensation"].to(param.device, torch.float32)
        exp_avg, exp_avg_sq = (self._unpack(state[k], param, k == "exp_avg") for k in ("exp_avg", "exp_avg_sq"))
        beta1, beta2 = group["betas"]
        adamw_update([master], [grad.float()], [exp_avg], [exp_avg_sq], [], [state["step"]],
                                foreach=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        param.copy_(master)  # rounds to the weight dtype
        if "compensation" in state:
            state["compensation"].copy_(master - param.float())
        state["exp_avg"], state["exp_avg_sq"] = self._pack(exp_avg, param, True), self._pack(exp_avg_sq, param, False)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every saved state tensor to its parameter's dtype and device: bf16 8-bit codes and absmax
        # would lose what they store, so the saved tensors are put back as they were, where they live.
        super().load_state_dict(state_dict)
        params = [param for group in self.param_groups for param in group["params"]]
        for index, saved in state_dict["state"].items():
            param = params[index]
            self.state[param] = {key: self._restore(value, _local(param), key) for key, value in saved.items()}

    def _restore(self, value, param: torch.Tensor, key: str):
        if isinstance(value, dict):
            return {k: self._restore(v, param, key) for k, v in value.items()}
        if key == "step":
            return value.clone()
        return value.to(self._home(param)).clone()



def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor



def second_moment(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """AdamW's second moment of `param` in fp32 and the step count, whichever optimizer holds it; None before its
    first step. bitsandbytes' 8-bit state and `StoredAdamW`'s 8-bit or bf16 state are dequantised: the merge's
    Fisher weights then read the quantised moment, whose block-wise error (~1% of the block's largest value) is far
    below the spread between submodels the weights express."""
    state = optimizer.state.get(param)
    if not state:
        return None
    if isinstance(optimizer, StoredAdamW):
        return optimizer.moment(param), float(state["step"])
    if "exp_avg_sq" in state:
        return state["exp_avg_sq"].float(), float(state["step"])
    if "state2" in state:  # bitsandbytes: `state2` is the second moment, 8-bit with `qmap2` or 32-bit
        value = state["state2"]
        if value.dtype == torch.uint8:
            from bitsandbytes.functional import dequantize_blockwise

            value = dequantize_blockwise(value, absmax=state["absmax2"], code=state["qmap2"], blocksize=QUANT_BLOCK)
        return value.float().view_as(param), float(state["step"])
    return None



def second_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Per parameter, AdamW's bias-corrected second moment: a running mean of the squared gradient over the last
    ~1/(1-beta2) steps, i.e. a diagonal empirical Fisher estimate that training already paid for.

    Stored in bf16 (the squares need range, not precision) to keep the file at half the fp32 weights. Frozen
    parameters have no optimizer state and are left out. With an 8-bit optimizer it is the dequantised 8-bit
    moment (`second_moment`). Collective for a sharded model (each moment is gathered).
    """
    beta2 = optimizer.param_groups[0]["betas"][1]
    moments = {}
    for name, param in model.named_parameters():
        found = second_moment(optimizer, param)
        if found is None:
            continue
        moment, step = found
        moment = fsdp.full_tensor(moment)
        moments[name] = (moment.float() / (1.0 - beta2 ** step)).to(torch.bfloat16).cpu().contiguous()
    return moments


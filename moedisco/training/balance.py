"""Auxiliary-loss-free load balancing (DeepSeek-V3, sec. 2.1.2), for routers that carry an expert bias.

    balancer = BiasBalancer(model, rate=1e-3)   # nothing to do for a model whose routers have no bias
    loss.backward(); optimizer.step(); balancer.step()
    balancer.close()

DeepSeek-V3 and GLM-4.5 route by sigmoid scores plus a per-expert bias (`e_score_correction_bias`) that only picks
the experts, never weights them, and that no gradient trains: after every step it moves by `rate` up for each
expert that got fewer tokens than the mean and down for each that got more. transformers ships the bias but not its
update, so without this a fine-tune of such a model has no balancing at all (it has no auxiliary loss either).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BIAS = "e_score_correction_bias"


class BiasBalancer:
    def __init__(self, model: torch.nn.Module, rate: float):
        self.rate = rate
        self.routers = [module for module in model.modules() if isinstance(getattr(module, BIAS, None), torch.Tensor)]
        for router in self.routers:  # in bf16 a step of 1e-3 vanishes once the bias passes 0.25
            setattr(router, BIAS, getattr(router, BIAS).float())
        self.counts = [torch.zeros_like(getattr(router, BIAS), dtype=torch.float64) for router in self.routers]
        self.handles = [router.register_forward_hook(self._counter(index)) for index, router in enumerate(self.routers)]
        self.since_taken: torch.Tensor | None = None  # tokens per expert, summed over layers, for the metrics

    def _counter(self, index: int):
        def count(module: torch.nn.Module, args, output) -> None:
            if module.training:  # held-out evaluations route too, and must not move the bias
                chosen = output[2].detach().flatten()
                self.counts[index] += torch.bincount(chosen, minlength=len(self.counts[index])).to(torch.float64)
        return count

    def step(self) -> None:
        """Move every bias towards a balanced load, by the tokens each expert got since the last step."""
        for router, load in zip(self.routers, self.counts):
            if dist.is_available() and dist.is_initialized():  # every rank applies the same update
                dist.all_reduce(load)
            if load.sum() > 0:
                bias = getattr(router, BIAS)
                bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=self.rate)
                self.since_taken = load.float().cpu() + (0 if self.since_taken is None else self.since_taken)
            load.zero_()

    def take_load(self) -> torch.Tensor | None:
        """Tokens each expert got since the last call, summed over the MoE layers (the routing as picked, bias and
        expert groups included): what the training metrics log as `router_load`."""
        taken, self.since_taken = self.since_taken, None
        return taken

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

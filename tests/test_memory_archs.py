"""The memory planner (moedisco.planning.memory_plan) against what a training step of each MoE architecture really
needs, on a tiny model of it trained by moedisco's own loop on the CPU (fp32):

- per decoder layer, `layer_bytes` against the bytes autograd keeps for that layer's backward: the unique storages
  of the tensors it saves (`saved_tensors_hooks`), parameters excluded; a dense first layer (DeepSeek-V3, GLM-4.5)
  is checked on its own;
- for the whole step, `memory_plan`'s total (weights, AdamW state and the costliest phase) against the peak of the
  bytes of all live tensors over a real step (forward, backward, optimizer step), counted op by op.

Both within 15%. The tiny models are shaped so that activations are most of the step's peak: the comparison is of
the per-token formula, not of the parameter count.
"""

from __future__ import annotations

import importlib.util
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM

from moedisco.config.spec import TrainConfig
from moedisco.job.metrics import MetricsWriter
from moedisco.planning.memory_plan import GB, layer_bytes, memory_plan
from moedisco.training.loop import TrainContext, TrainHooks, _Loop
from moedisco.training.optimizer import make_optimizer

CPU = torch.device("cpu")
ROWS, SEQ_LEN, HIDDEN = 2, 256, 64
TOLERANCE = 0.15

# Widths per architecture, besides the common ones of `tiny_config`: experts twice the hidden size wide, two of four
# routed per token, a shared expert and a dense first layer where the architecture has them.
MOE = dict(moe_intermediate_size=2 * HIDDEN, intermediate_size=4 * HIDDEN)
DEEPSEEK = dict(MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1)
# MLA: the value heads narrower than the query/key heads (as DeepSeek-V3's 128 against 192), which the CPU's SDPA
# computes on its math path; the q-LoRA variant has a latent query too.
MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
ARCHITECTURES = {
    "qwen2_moe": ("qwen2_moe", dict(MOE, num_experts=4, shared_expert_intermediate_size=HIDDEN,
                                    decoder_sparse_step=1)),
    "mixtral": ("mixtral", dict(num_local_experts=4, intermediate_size=2 * HIDDEN)),
    "olmoe": ("olmoe", dict(num_experts=4, intermediate_size=2 * HIDDEN)),
    "qwen3_moe": ("qwen3_moe", dict(MOE, num_experts=4, decoder_sparse_step=1, head_dim=HIDDEN // 4)),
    "deepseek_v3": ("deepseek_v3", dict(DEEPSEEK, **MLA, q_lora_rank=None)),
    "deepseek_v3-q_lora": ("deepseek_v3", dict(DEEPSEEK, **MLA, q_lora_rank=48)),
    "glm4_moe": ("glm4_moe", dict(DEEPSEEK, n_group=1, head_dim=HIDDEN // 4)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, intermediate_size=2 * HIDDEN, head_dim=HIDDEN // 4,
                                sliding_window=8)),
    "flex_olmo": ("flex_olmo", dict(num_experts=4, intermediate_size=2 * HIDDEN)),
    # LLaMA-MoE: a model class of moedisco's own; `size_experts` from `moe_intermediate_size`.
    "llama_moe": ("llama_moe", dict(num_experts=4, intermediate_size=8 * HIDDEN, moe_intermediate_size=2 * HIDDEN)),
}
HAS_LLAMA_MOE = importlib.util.find_spec("moedisco.models.llama_moe") is not None


def tiny_config(name: str):
    model_type, widths = ARCHITECTURES[name]
    if model_type == "llama_moe":
        import moedisco.models.llama_moe  # noqa: F401 - registers the model type with transformers
    common = dict(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=256, max_position_embeddings=2 * SEQ_LEN, num_experts_per_tok=2, bos_token_id=0,
                  eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    return AutoConfig.for_model(model_type, **{**common, **widths})


class LiveTensors(TorchDispatchMode):
    """The bytes of every CPU tensor storage alive, counted from the ops that create them (and those `add`ed), freed
    when their storage is; `peak` the most at once."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, weakref.ref] = {}
        self.now = self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if key in self.alive:
            return
        self.alive[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key: int, size: int) -> None:
        self.alive.pop(key, None)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.add(tensor)
        return out


def _measure(config, train: TrainConfig, tmp_path) -> tuple[list[float], int, int]:
    """(per decoder layer, the bytes autograd keeps per token; the peak bytes of live tensors over a training step;
    the parameters) of the second step of moedisco's training loop (the first makes AdamW's state)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = make_optimizer(model, train)
    sequences = torch.randint(2, config.vocab_size, (2 * ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    context = TrainContext(tmp_path, stage="submodel", seed=0, metrics=MetricsWriter(tmp_path / "m.jsonl"),
                           progress=False, hooks=TrainHooks())
    loop = _Loop(model, model, optimizer, sequences, None, train, context, CPU, {"step": 0, "seconds": 0.0})
    loop._step(0)

    layers = model.get_decoder().layers
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, current = {}, [None]
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, index=index: current.__setitem__(0, index))
    model.get_decoder().norm.register_forward_pre_hook(lambda *_: current.__setitem__(0, None))

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in parameters and not any(pointer in seen for seen in kept.values()):
            kept.setdefault(current[0], {})[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    live = LiveTensors()
    with live, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for tensor in [*model.parameters(), *(v for state in optimizer.state.values() for v in state.values())]:
            if isinstance(tensor, torch.Tensor):
                live.add(tensor)
        loop._step(1)
    tokens = ROWS * SEQ_LEN
    return ([sum(kept[index].values()) / tokens for index in range(len(layers))], live.peak,
            sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.skipif(
    name == "llama_moe" and not HAS_LLAMA_MOE, reason="no moedisco.models.llama_moe")) for name in ARCHITECTURES])
def test_the_plan_is_what_a_training_step_needs(name, tmp_path):
    config = tiny_config(name)
    train = TrainConfig(steps=2, batch_size=ROWS, precision="fp32", grad_clip=0.0)
    measured_layers, measured_peak, params = _measure(config, train, tmp_path)

    planned_layers = layer_bytes(config, SEQ_LEN, 4, on_gpu=False)
    assert len(planned_layers) == len(measured_layers)
    for index, (planned, measured) in enumerate(zip(planned_layers, measured_layers)):
        assert planned == pytest.approx(measured, rel=TOLERANCE), (name, f"layer {index}", planned, measured)

    plan = memory_plan(params, config, train, SEQ_LEN, 1e9, on_gpu=False)
    assert plan["total_gb"] * GB == pytest.approx(measured_peak, rel=TOLERANCE), (name, plan, measured_peak)
    # What the layers keep is most of the step's peak (the rest: weights, AdamW's moments, the loss), so the total
    # checks the per-token formula rather than the parameter count.
    assert sum(measured_layers) * ROWS * SEQ_LEN > 0.5 * measured_peak

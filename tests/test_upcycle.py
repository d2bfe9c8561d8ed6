"""Branching from a local dense checkpoint: its FFN becomes every expert."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moedisco.config.spec import ModelConfig
from moedisco.models.architecture import parameter_roles
from moedisco.models.upcycle import upcycle_dense
from moedisco.stages.split import load_pretrained_moe

DENSE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _dense_checkpoint(model_type, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **DENSE)).eval()
    model.save_pretrained(tmp_path / model_type)
    return model, tmp_path / model_type


@pytest.mark.parametrize("model_type", ["mistral", "llama"])
def test_upcycled_mixtral_computes_the_dense_function(model_type, tmp_path):
    dense, path = _dense_checkpoint(model_type, tmp_path)
    moe = upcycle_dense(path, ModelConfig(arch="mixtral", num_experts=4, num_experts_per_tok=2)).eval()
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 4
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,moe_type", [("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")])
def test_upcycled_qwen_experts_are_copies_of_the_ffn(model_type, moe_type, tmp_path):
    dense, path = _dense_checkpoint(model_type, tmp_path)
    moe = load_pretrained_moe(path, ModelConfig(arch=moe_type, num_experts=4, num_experts_per_tok=2))
    assert moe.config.model_type == moe_type
    layer, dense_mlp = moe.model.layers[1].mlp, dense.model.layers[1].mlp
    gate_up = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight])
    for expert in range(4):
        assert torch.equal(layer.experts.gate_up_proj[expert], gate_up)
        assert torch.equal(layer.experts.down_proj[expert], dense_mlp.down_proj.weight)
    assert torch.equal(moe.model.layers[0].self_attn.q_proj.weight, dense.model.layers[0].self_attn.q_proj.weight)
    assert set(parameter_roles(moe.config).values()) >= {"shared", "expert", "router"}


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained_moe(tmp_path, ModelConfig())

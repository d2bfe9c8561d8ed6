"""LLaMA-MoE (moedisco.models.llama_moe): the published layout loads and saves back, the gate behaves as published
(noise in training only, balance loss on request), one-expert submodels equal forced routing, and it trains."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moedisco.models.llama_moe import LlamaMoeConfig, LlamaMoeDecoderLayer, LlamaMoeForCausalLM, register

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_selects=2)
EXPERT_NAMES = ("weight_gate", "weight_up", "weight_down")


def tiny_config(**overrides) -> LlamaMoeConfig:
    return AutoConfig.for_model("llama_moe", **{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LlamaMoeForCausalLM:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**overrides)).eval()


def tokens(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def write_published_config(folder, num_experts: int, num_selects: int, width: int) -> None:
    """config.json with the keys of the published llama-moe/LLaMA-MoE-v1-3_0B-2_16 config.json, at a tiny size."""
    layers = TINY["num_hidden_layers"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "add_weight_norm": False, "architectures": ["LlamaMoEForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "auto_map": {
            "AutoConfig": "configuration_llama_moe.LlamaMoEConfig",
            "AutoModel": "modeling_llama_moe_hf.LlamaMoEModel",
            "AutoModelForCausalLM": "modeling_llama_moe_hf.LlamaMoEForCausalLM"},
        "bos_token_id": 1, "calculator_type": "UniversalCalculator", "capacity_factor": 1.25, "drop_tokens": True,
        "dropped_padding": "zero", "eos_token_id": 2, "gate_add_noise": True, "gate_balance_loss_weight": 0.01,
        "gate_network": "mlp", "gate_noise_epsilon": 0.01, "gate_type": "TopKBalancedNoisyGate",
        "gate_use_balance": True, "gate_use_softmax": True, "gates": "mlp", "hidden_act": "silu",
        "hidden_size": TINY["hidden_size"], "initializer_range": 0.02, "intermediate_size": width * num_experts,
        "max_position_embeddings": 64, "model_type": "llama_moe", "multiply_gate_scores": True,
        "num_attention_heads": 4, "num_experts": num_experts, "num_hidden_layers": layers, "num_key_value_heads": 4,
        "num_selects": num_selects, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "score_scale_factor": 8.0,
        "size_experts": [[width] * num_experts for _ in range(layers)], "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.36.2", "use_cache": True, "vocab_size": TINY["vocab_size"],
    }))


def published_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under the published names: every fused [E, ...] expert tensor as E tensors `<name>.J`."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.rsplit(".", 1)[-1] in EXPERT_NAMES:
            state.update({f"{name}.{index}": piece.clone() for index, piece in enumerate(tensor)})
        else:
            state[name] = tensor.clone()
    return state


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_published_layout_loads_and_saves_back(tmp_path):
    # Twelve experts: the per-expert tensors must stack in numeric order (10, 11 after 9), not lexical.
    folder = tmp_path / "published"
    write_published_config(folder, num_experts=12, num_selects=2, width=8)
    config = AutoConfig.from_pretrained(folder)  # local class, though the file names remote code
    assert isinstance(config, LlamaMoeConfig) and config.moe_intermediate_size == 8
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config).eval()
    save_file(published_state(original), folder / "model.safetensors", metadata={"format": "pt"})

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(loaded, LlamaMoeForCausalLM)
    assert loaded.model.layers[1].mlp.calculator.experts.weight_down.shape == (12, 32, 8)
    ids = tokens()
    assert torch.equal(loaded(ids).logits, original(ids).logits)

    # save_pretrained reverses the conversion: the folder holds the published per-expert names again.
    loaded.save_pretrained(tmp_path / "resaved")
    assert "auto_map" not in json.loads((tmp_path / "resaved" / "config.json").read_text())
    resaved = saved_tensors(tmp_path / "resaved")
    assert set(resaved) == set(published_state(original))
    assert resaved["model.layers.0.mlp.calculator.experts.weight_gate.11"].shape == (8, 32)
    assert resaved["model.layers.0.mlp.calculator.experts.weight_down.3"].shape == (32, 8)
    assert torch.equal(resaved["model.layers.1.mlp.calculator.experts.weight_up.10"],
                       original.model.layers[1].mlp.calculator.experts.weight_up[10])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    assert torch.equal(again(ids).logits, original(ids).logits)


def test_fused_layout_loads_as_is(tmp_path):
    """A folder holding the runtime (fused) names, as moedisco's save_weights writes it, loads untouched."""
    original = tiny_model()
    original.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens()
    assert torch.equal(loaded(ids).logits, original(ids).logits)


def test_config_aliases_width_and_registration(tmp_path):
    register()  # importing registered it already: again is harmless
    config = tiny_config(num_experts_per_tok=3, router_aux_loss_coef=0.05)
    assert (config.num_selects, config.num_experts_per_tok) == (3, 3)
    assert config.gate_balance_loss_weight == config.router_aux_loss_coef == 0.05
    config.num_experts_per_tok, config.router_aux_loss_coef = 1, 0.5
    assert (config.num_selects, config.gate_balance_loss_weight) == (1, 0.5)
    assert config.moe_intermediate_size == 128 // 4  # size_experts None: the FFN split evenly
    with pytest.raises(AttributeError):
        config.moe_intermediate_size = 7
    sized = tiny_config(size_experts=[[16] * 4, [16] * 4])
    assert sized.moe_intermediate_size == 16
    assert tiny_config(moe_intermediate_size=16).size_experts == [[16] * 4, [16] * 4]
    sized.save_pretrained(tmp_path)
    assert "moe_intermediate_size" not in json.loads((tmp_path / "config.json").read_text())
    reread = AutoConfig.from_pretrained(tmp_path)
    assert reread.size_experts == [[16] * 4, [16] * 4] and reread.num_selects == 2


def test_uneven_or_unsupported_sizes_are_refused():
    with pytest.raises(ValueError, match=r"layer 1 has expert sizes \[16, 8, 16, 16\]"):
        tiny_config(size_experts=[[16] * 4, [16, 8, 16, 16]])
    with pytest.raises(ValueError, match="does not split into 3 equal experts"):
        tiny_config(num_experts=3)
    with pytest.raises(ValueError, match="num_selects 5"):
        tiny_config(num_selects=5)
    with pytest.raises(ValueError, match="calculator_type='SwitchDropTokenCalculator' is not implemented"):
        tiny_config(calculator_type="SwitchDropTokenCalculator")


def test_aux_loss_only_with_output_router_logits():
    model, ids = tiny_model(), tokens()
    plain = model(ids, labels=ids)
    assert plain.aux_loss is None and plain.router_logits is None
    expected = torch.nn.functional.cross_entropy(plain.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(plain.loss, expected)

    routed = model(ids, labels=ids, output_router_logits=True)
    assert routed.aux_loss > 0 and len(routed.router_logits) == 2 and routed.router_logits[0].shape == (24, 4)
    assert torch.allclose(routed.loss, plain.loss + 0.01 * routed.aux_loss)
    model.config.output_router_logits = True  # what moedisco's fine-tune sets
    assert torch.allclose(model(ids, labels=ids).loss, routed.loss)
    unbalanced = tiny_model(gate_use_balance=False)
    assert unbalanced(ids, labels=ids, output_router_logits=True).aux_loss is None


def test_noise_only_in_training_and_balance_loss_reaches_the_gate():
    model = tiny_model()
    gate = model.model.layers[0].mlp.gate
    x = torch.randn(16, 32)
    clean = gate.gate_network(x)
    assert torch.equal(gate(x)[0], clean) and torch.equal(gate(x)[0], clean)  # eval: no noise
    gate.train()
    first, second = gate(x)[0], gate(x)[0]
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)
    assert 0.3 < float((first - clean).detach().std()) < 1.2  # weight_noise starts at zero: std softplus(0) + 0.01

    model.train()
    aux = model(tokens(), output_router_logits=True).aux_loss
    aux.backward()
    assert gate.weight_noise.weight.grad.abs().sum() > 0  # the smooth load is differentiable in the noise scale
    assert gate.gate_network[0].weight.grad.abs().sum() > 0

    quiet = tiny_model(gate_add_noise=False).train()
    assert not any("weight_noise" in name for name in quiet.state_dict())
    quiet_gate = quiet.model.layers[0].mlp.gate
    assert torch.equal(quiet_gate(x)[0], quiet_gate.gate_network(x))


def test_meta_build_runs_one_layer_at_a_time():
    """As moedisco streams a model: built on meta, weights assigned, each layer run alone by the decoder's forward."""
    real = tiny_model(tie_word_embeddings=True)
    assert real.lm_head.weight.data_ptr() == real.model.embed_tokens.weight.data_ptr()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(real.config)
    assert all(p.is_meta for p in meta.parameters())
    decoder = meta.get_decoder()
    assert all(isinstance(layer, LlamaMoeDecoderLayer) for layer in decoder.layers)
    decoder.load_state_dict(real.model.state_dict(), assign=True)
    decoder.rotary_emb = type(decoder.rotary_emb)(config=decoder.config)
    layers, decoder.config = decoder.layers, copy.copy(decoder.config)
    decoder.config.num_hidden_layers = 1
    decoder.eval()

    ids = tokens()
    hidden = real.model.embed_tokens(ids)
    for layer in layers:
        decoder.layers = torch.nn.ModuleList([layer])
        captured = {}
        handle = layer.register_forward_hook(lambda module, args, out: captured.update(out=out[0]))
        decoder(inputs_embeds=hidden, use_cache=False)
        handle.remove()
        hidden = captured["out"]
    assert torch.allclose(decoder.norm(hidden), real.model(ids).last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("columns", [1, 2])
def test_one_expert_model_equals_forced_routing(columns):
    sizes = dict(size_experts=[[32] * 4, [32] * 4])
    full = tiny_model(**sizes, score_scale_factor=2.0)
    # As moedisco's submodels: num_experts changed, size_experts still listing four (their width is what counts).
    single = tiny_model(seed=5, **sizes, score_scale_factor=2.0, num_experts=1, num_selects=1)
    full_state, single_state = full.state_dict(), single.state_dict()
    assert set(full_state) == set(single_state)
    expert = 2
    for name, tensor in full_state.items():
        if tensor.shape != single_state[name].shape:  # only the experts' and router's leading E axes differ
            assert tensor.shape[0] == 4 and single_state[name].shape[0] == 1
            assert ".experts." in name or ".gate." in name
        if ".experts." in name:
            single_state[name] = tensor[expert : expert + 1].clone()
        elif ".gate." not in name:
            single_state[name] = tensor.clone()
    single.load_state_dict(single_state)

    def force(module, args, output):  # a router hook, as moedisco's oracle routing; maybe fewer than k columns
        logits = torch.full_like(output[0], -1e4)
        logits[:, expert] = 1e4
        weights, indices = logits.softmax(dim=-1).topk(columns, dim=-1)
        return logits, weights, indices

    handles = [layer.mlp.gate.register_forward_hook(force) for layer in full.model.layers]
    ids = tokens()
    forced = full(ids, output_router_logits=True)
    for handle in handles:
        handle.remove()
    assert torch.equal(forced.logits, single(ids).logits)
    assert torch.isfinite(forced.aux_loss)


def test_training_steps_lower_the_loss_with_gradient_checkpointing():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    model.train()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = tokens(shape=(4, 16))
    losses = []
    for _ in range(12):
        out = model(ids, labels=ids, output_router_logits=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 1.0
    assert model.model.layers[0].mlp.gate.weight_noise.weight.grad is not None


def test_bf16_and_cached_generation():
    model = tiny_model().to(torch.bfloat16).train()
    ids = tokens()
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16

    model = tiny_model()
    generated = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    uncached = ids[:1, :5]
    for _ in range(4):
        uncached = torch.cat([uncached, model(uncached).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, uncached)

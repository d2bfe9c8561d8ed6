"""Shared fixtures: tiny models of every supported architecture and a tiny job spec, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from moedisco.config.architectures import ARCHITECTURES  # noqa: E402
from moedisco.config.loading import build_spec
from moedisco.config.spec import ModelConfig  # noqa: E402
from moedisco.models.architecture import build_moe_config

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "corpus.jsonl"


def tiny_model_config(arch: str, num_experts: int = 4) -> ModelConfig:
    return ModelConfig(arch=arch, num_experts=num_experts, num_experts_per_tok=2, hidden_size=32,
                       intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128)


def tiny_hf_config(arch: str, num_experts: int = 4):
    return build_moe_config(tiny_model_config(arch, num_experts), vocab_size=97, eos_id=0, pad_id=1)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


def tiny_spec_dict(output_dir: Path, **sections) -> dict:
    """A spec that runs the whole pipeline on the bundled corpus in seconds."""
    raw = {
        "name": "test", "output_dir": str(output_dir), "seed": 0,
        "data": {"train": str(CORPUS), "max_documents": 240, "sequence_length": 64, "eval_fraction": 0.1},
        "tokenizer": {"vocab_size": 512},
        "embed": {"batch_size": 64, "max_length": 128},
        "model": tiny_model_config("qwen2_moe").model_dump(mode="json"),
        # Cosine with a short warm-up: the tests' few steps at a high rate need a decaying one to lower the loss.
        "submodel": {"steps": 12, "batch_size": 4, "lr": 6e-3, "schedule": "cosine", "warmup_ratio": 0.03,
                     "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4},
        "finetune": {"steps": 8, "batch_size": 4, "lr": 6e-3, "schedule": "cosine", "eval_every": 4,
                     "eval_batches": 2, "checkpoint_every": 4},
        "full_parameter": {"steps": 12, "batch_size": 4, "lr": 6e-3, "eval_every": 4, "eval_batches": 2,
                           "checkpoint_every": 4},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture
def tiny_spec_factory(tmp_path):
    def make(**sections):
        return build_spec(tiny_spec_dict(tmp_path / "job", **sections))

    return make


POSTGRES_URL = os.environ.get("MOEDISCO_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A job store on SQLite, and on PostgreSQL where MOEDISCO_TEST_POSTGRES_URL names a database (CI starts one
    with service/scripts/start_postgres.sh); that case skips elsewhere."""
    from service.store.models import Base
    from service.store.store import Store

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    elif POSTGRES_URL:
        url = POSTGRES_URL
    else:
        pytest.skip("PostgreSQL: set MOEDISCO_TEST_POSTGRES_URL (bash service/scripts/start_postgres.sh prints one)")
    store = Store(url)
    Base.metadata.drop_all(store.engine)  # a shared PostgreSQL database: start every test from empty tables
    Base.metadata.create_all(store.engine)
    yield store
    store.close()


def make_job(store, tmp_path, job_id: str, owner: str = "admin", **sections):
    spec = tiny_spec_dict(tmp_path / job_id, **sections)
    spec.setdefault("method", "moe_disco")
    return store.create_job(job_id, spec, runner="local", owner=owner)

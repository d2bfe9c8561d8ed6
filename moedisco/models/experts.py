"""A finished MoE's expert set, grown or shrunk tensor by tensor, and where each expert came from.

    folder = base_model(Path("runs/tiny"))           # a job folder's final/, or a Hugging Face model folder as it is
    spec = with_checkpoint_model(spec)               # an extend/retire job's `model` and tokenizer: the base's
    rewrite_experts(folder, out, 3, rows=lambda name, role, tensor: tensor[[0, 1, 3]])    # expert 2 dropped
    expert_provenance(read_config(out))              # [{"expert": 0, "job": "tiny", "cluster": 0, ...}, ...]

Which tensors are shared, per expert or router rows comes from `moedisco.models.architecture.parameter_roles`, so
this works for every architecture the split and the merge handle. Each expert's provenance travels in the model's
`config.json` (key `moedisco_experts`): the job, corpus and cluster it was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import PretrainedConfig

from moedisco.config.loading import with_pretrained_arch
from moedisco.config.spec import JobSpec, ModelConfig
from moedisco.job.provenance import PROVENANCE_KEY, base_job, expert_provenance_of
from moedisco.models.architecture import (
    Role,
    entry_of,
    mixing_tensors,
    num_experts_of,
    parameter_roles,
    read_config,
    with_num_experts,
)
from moedisco.models.weights import SavedWeights, WeightsWriter

MAX_FILE_BYTES = 1 << 30


def base_model(base: Path) -> Path:
    """The model folder of `extend.base` / `retire.base`: a finished job's final/, or a model folder as it is."""
    from moedisco.config.loading import load_saved_spec
    from moedisco.job.layout import JobPaths, is_done
    from moedisco.job.registry import plan

    base = base_job(base)
    if (base / "spec.yaml").is_file():
        try:
            last = plan(load_saved_spec(base / "spec.yaml"))[-1][-1]
        except ValueError as error:  # SpecError
            raise ValueError(f"{base}: a job folder whose spec.yaml cannot be read ({error})") from None
        if not (base / "final" / "config.json").is_file() or not is_done(JobPaths(base), last.marker):
            raise ValueError(f"{base}: the job has no final/ model yet (its {last.stage} stage has not finished): "
                             "only a finished job can be extended or retired")
        return base / "final"
    if (base / "config.json").is_file():
        return base
    raise ValueError(f"{base}: neither a job folder with a final/ model nor a Hugging Face model folder "
                     "(no config.json)")


def with_checkpoint_model(spec: JobSpec) -> JobSpec:
    """A job's spec with its `model` section describing the checkpoint it starts from. An `extend` or `retire`
    job: the base's architecture and widths, its experts plus the new ones or less the retired ones, and, for an
    extension, the base's tokenizer, which the new corpus must be tokenized with. A job on a pretrained MoE
    checkpoint (`model.pretrained`): the checkpoint's architecture, which `model.arch` may leave out but may not
    contradict. Otherwise `spec` unchanged. A ValueError names the field when the checkpoint cannot be used."""
    if spec.method not in ("extend", "retire"):
        return with_pretrained_arch(spec)
    section = spec.extend if spec.method == "extend" else spec.retire
    folder = base_model(section.base)
    config = read_config(folder)
    experts = num_experts_of(config)
    _check_resizable(config, spec.method)
    if spec.method == "extend":
        experts += spec.extend.new_experts
    else:
        unknown = [k for k in spec.retire.experts if k >= experts]
        if unknown or len(spec.retire.experts) > experts - 2:
            raise ValueError(f"retire.experts {spec.retire.experts}: the base model has experts 0-{experts - 1}, "
                             "and at least two must stay (an MoE routes among two or more)")
        experts -= len(spec.retire.experts)
    raw = {**spec.model.model_dump(), **model_widths(config), "arch": config.model_type, "pretrained": folder,
           "num_experts": experts, "num_experts_per_tok": min(config.num_experts_per_tok, experts)}
    try:
        model = ModelConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in error.errors())
        raise ValueError(f"{spec.method}.base {section.base}: its model cannot be described as this job's "
                         f"`model` ({problems})") from None
    update = {"model": model}
    if spec.method == "extend":
        update["tokenizer"] = spec.tokenizer.model_copy(update={"path": folder})
    return spec.model_copy(update=update)


def _check_resizable(config: PretrainedConfig, method: str) -> None:
    """An extension trains each new expert alone in a submodel; a retirement drops router rows one expert at a
    time: architectures whose router cannot do either are refused before anything runs."""
    if method == "extend" and entry_of(config).min_group > 1:
        raise ValueError(f"extend.base: a {config.model_type} model routes among groups of at least "
                         f"{entry_of(config).min_group} experts, so a new expert cannot train alone; not supported")
    mixing = mixing_tensors(config)
    if mixing:
        raise ValueError(f"{method}.base: a {config.model_type} model's router mixes experts ({mixing[0]}: every "
                         "expert's score reads every other's), so experts cannot be added or removed one at a time")


WIDTHS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
          "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


def model_widths(config: PretrainedConfig) -> dict[str, int]:
    """The `model` section's widths as a saved model has them, so that a job's spec describes the model it trains
    (`model.pretrained` decides either way). The expert width is read from the architecture's own key (OLMoE's is
    `intermediate_size`)."""
    widths = {name: value for name in WIDTHS if isinstance(value := getattr(config, name, None), int) and value >= 8
              or name.startswith("num_") and isinstance(value, int) and value >= 1}
    expert_width = getattr(config, entry_of(config).expert_width_key, None)
    if isinstance(expert_width, int) and expert_width >= 8:
        widths["moe_intermediate_size"] = expert_width
    return widths


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.<i>.`), None outside the layers."""
    found = re.search(r"\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


Rows = Callable[[str, Role, torch.Tensor], torch.Tensor]


def rewrite_experts(source: Path, out: Path, num_experts: int, rows: Rows,
                    shared: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    provenance: list[dict] | None = None) -> Path:
    """Write `source`'s model to `out` with `num_experts` experts: each per-expert or router tensor of `source` is
    replaced by `rows(name, role, tensor)` (leading dimension `num_experts`), each shared one by `shared(name,
    tensor)` (default: as it is). One tensor in memory at a time, plus the file being written."""
    source_config = read_config(source)
    if mixing_tensors(source_config):
        raise ValueError(f"{source_config.model_type}: its router mixes experts; experts cannot be rewritten one at "
                         "a time")
    config, roles = with_num_experts(source_config, num_experts), parameter_roles(source_config)
    out.mkdir(parents=True, exist_ok=True)
    writer = WeightsWriter(out, MAX_FILE_BYTES)
    with SavedWeights(source) as weights:
        for name in weights.files:
            role, tensor = roles[name], weights.get(name)
            if role == "shared":
                new = shared(name, tensor) if shared else tensor
            else:
                new = rows(name, role, tensor)
                if new.shape[0] != num_experts or new.shape[1:] != tensor.shape[1:]:
                    raise ValueError(f"{name}: rewritten to {tuple(new.shape)}, expected ({num_experts}, "
                                     f"{', '.join(map(str, tensor.shape[1:]))})")
            writer.add(name, new)
    writer.close()
    if provenance is not None:
        set_provenance(config, provenance)
    config.save_pretrained(out)
    return out


def expert_provenance(config: PretrainedConfig) -> list[dict]:
    """Where each expert of a model came from (`moedisco.job.provenance.expert_provenance_of`)."""
    return expert_provenance_of(config.to_dict())


def set_provenance(config: PretrainedConfig, entries: list[dict]) -> None:
    if len(entries) != num_experts_of(config):
        raise ValueError(f"{len(entries)} provenance entries for {num_experts_of(config)} experts")
    setattr(config, PROVENANCE_KEY, [{**entry, "expert": k} for k, entry in enumerate(entries)])


def record_provenance(folder: Path, entries: list[dict]) -> None:
    """Write `entries` (one per expert, in order) into the config.json of the model in `folder`."""
    config = read_config(folder)
    set_provenance(config, entries)
    config.save_pretrained(folder)

"""Turns a submitted spec into the spec the service runs, or a 422 naming every offending field.

    spec_dict = prepare_spec(job_in, job_id, settings, reader_of(caller.name, caller.is_admin, store))  # or a 422

Pydantic has already checked types and ranges. On top of that the service puts the job in its own folder, keeps
input paths and object-storage URIs where the submitter may read and write (`service.jobs.access`),
refuses what JSON and PostgreSQL cannot hold, describes an extension's or retirement's model as its base's,
plans each training stage's memory and refuses an absurd model size; `prepare_spec` lists each check.

The base of `method: extend` / `retire` may be named by the job that made it: `extend.base: job:3f2a9c1b7d4e`
(a service shorthand) or `jobs/3f2a9c1b7d4e` (relative to MOEDISCO_DATA_DIR) both mean that job's folder, and
pass the same access checks as any path: another user's job reads as one that does not exist.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError

from moedisco.config.loading import with_pretrained_arch
from moedisco.config.spec import JobSpec, ModelConfig
from moedisco.io.storage import is_uri
from moedisco.job.registry import STAGE
from service.core.config import Settings
from service.jobs.access import Reader, error, input_errors
from service.schemas import JOB_ID_PATTERN, JobCreate

MODEL_FOLDER = "a folder (a saved Hugging Face model or tokenizer)"
FOLDER_INPUTS = {("tokenizer", "path"): MODEL_FOLDER, ("embed", "model_path"): MODEL_FOLDER,  # loaded as folders
                 ("model", "pretrained"): MODEL_FOLDER, ("evaluate", "baseline"): MODEL_FOLDER,
                 ("extend", "base"): "a folder (a finished job's, or a saved Hugging Face MoE model)",
                 ("retire", "base"): "a folder (a finished job's, or a saved Hugging Face MoE model)"}
BASE_FIELDS = (("extend", "base"), ("retire", "base"))
JOB_REFERENCE = "job:"  # `extend.base: job:<id>`: that job's folder
TRAIN_SECTIONS = tuple(dict.fromkeys(stage.train_config for stage in STAGE.values() if stage.trained))


def _unstorable(value: Any, loc: tuple = ()) -> Iterator[dict]:
    if isinstance(value, float) and not math.isfinite(value):
        yield error(loc, "must be a finite number", value)
    elif isinstance(value, (str, Path)) and "\x00" in str(value):
        yield error(loc, "must not contain NUL characters", value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _unstorable(key, (*loc, str(key)))
            yield from _unstorable(item, (*loc, str(key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _unstorable(item, (*loc, index))


def _not_folders(raw: dict) -> list[dict]:
    """The inputs loaded as folders (a tokenizer, an embedding model, a pretrained model, the base of an extension
    or retirement) that are not one: a file there would fail later, inside the planner or the stage, instead of
    naming the field."""
    values = {loc: (raw.get(loc[0]) or {}).get(loc[1]) for loc in FOLDER_INPUTS}
    return [error(loc, f"must be {FOLDER_INPUTS[loc]}", value)
            for loc, value in values.items() if value is not None and not is_uri(value) and not Path(value).is_dir()]


def _job_references(raw: dict, settings: Settings) -> list[dict]:
    """`extend.base` / `retire.base` given as `job:<id>` replaced in place by that job's folder, which the access
    checks then treat as any path; an error for a malformed id (no path is built from it)."""
    errors = []
    for section, field in BASE_FIELDS:
        holder = raw.get(section) or {}
        value = holder.get(field)
        if not isinstance(value, str) or not value.startswith(JOB_REFERENCE):
            continue
        job_id = value.removeprefix(JOB_REFERENCE)
        if re.fullmatch(JOB_ID_PATTERN, job_id):
            holder[field] = str(settings.jobs_dir / job_id)
        else:
            errors.append(error((section, field), "`job:<id>` needs a job id of 12 hex digits", value))
    return errors


def _with_checkpoint_model(spec: JobSpec) -> JobSpec:
    """An extension's or retirement's spec with the base's model (and, extending, its tokenizer), as the runner
    will run it (`moedisco.models.experts.with_checkpoint_model`); a 422 naming `<method>.base` when the base is no
    finished model, or `retire.experts` when they do not fit it. Other methods: the pretrained checkpoint's
    architecture (`with_pretrained_arch`), or a 422 naming `model.arch`."""
    if spec.method not in ("extend", "retire"):
        try:  # a pretrained MoE checkpoint's architecture, read from its config.json without model code
            return with_pretrained_arch(spec)
        except ValueError as failure:
            raise RequestValidationError([error(("model", "arch"), str(failure), spec.model.arch)])
    from moedisco.models.architecture import num_experts_of, read_config
    from moedisco.models.experts import base_model, with_checkpoint_model

    base = getattr(spec, spec.method).base
    try:
        num_experts_of(read_config(base_model(base)))
    except (OSError, ValueError, AttributeError, TypeError) as failure:  # AttributeError: a config of no MoE
        raise RequestValidationError([error((spec.method, "base"), f"not a finished MoE model: {failure}", base)])
    try:
        return with_checkpoint_model(spec)
    except ValueError as failure:  # the base loads: the experts asked for, or a model the spec cannot describe
        if str(failure).startswith("retire.experts"):
            raise RequestValidationError([error(("retire", "experts"), str(failure), spec.retire.experts)])
        raise RequestValidationError([error((spec.method, "base"), str(failure), base)])


def parameter_upper_bound(model: ModelConfig, vocab_size: int) -> int:
    """At least as many parameters as the model has: embeddings and head, and per layer attention plus every
    expert (and a shared one) at the widest FFN width. Exact enough to tell 10^9 from 10^18."""
    ffn = max(model.intermediate_size, model.moe_intermediate_size, model.shared_expert_intermediate_size)
    per_layer = 4 * model.hidden_size**2 + (model.num_experts + 1) * 3 * model.hidden_size * ffn
    return 2 * vocab_size * model.hidden_size + model.num_hidden_layers * per_layer


def _check_size(spec: JobSpec, settings: Settings) -> dict | None:
    if spec.model.pretrained is not None:  # a checkpoint on disk is as large as it is
        return None
    vocab = spec.model.overrides.get("vocab_size", spec.tokenizer.vocab_size)
    bound = parameter_upper_bound(spec.model, vocab if isinstance(vocab, int) else spec.tokenizer.vocab_size)
    if bound <= settings.max_model_parameters:
        return None
    model = spec.model
    return error(("model",), f"up to about {bound:.2g} parameters (hidden_size {model.hidden_size}, "
                              f"{model.num_hidden_layers} layers, {model.num_experts} experts): more than "
                              f"MOEDISCO_MAX_MODEL_PARAMETERS ({settings.max_model_parameters:.2g})", model.hidden_size)


def prepare_spec(job_in: JobCreate, job_id: str, settings: Settings, reader: Reader) -> dict:
    """The spec to run, as a dict; a RequestValidationError naming every offending field. The service:
      - puts the job in MOEDISCO_DATA_DIR/jobs/<id>/, whatever `output_dir` the client sent (it never escapes);
      - resolves input paths (data, tokenizer, models, the base of an extension or retirement, which may be named
        `job:<id>`) against MOEDISCO_DATA_DIR and requires them to exist and to be the submitter's (`reader`) to
        read, and `resources.storage_path` (where the Ray runner writes) theirs to write, on the server or on
        object storage (`service.jobs.access`);
      - describes an extension's or retirement's model by its base (the base's checkpoint, architecture and
        experts, as the runner will), refusing a base that is no finished model or `retire.experts` it lacks;
      - refuses NaN/infinity and NUL characters, which JSON responses and PostgreSQL cannot hold;
      - sets the prices the job is billed at (`resources.prices`, `node_groups`, `price_changes`,
        `idle_timeout_s`) to the operator's (MOEDISCO_PRICES_FILE), whatever the client sent;
      - plans each training stage's memory measures (`memory: auto`) and refuses a stage that fits no device of its
        tier, naming the stage, the device and the shortfall;
      - refuses a model built from the spec whose size is absurd (`model.hidden_size: 1000000000`): a rough upper
        bound of its parameter count, from the widths alone, beyond MOEDISCO_MAX_MODEL_PARAMETERS. Not a memory
        plan (whether a job fits its tiers): a sanity bound that needs no torch in the API."""
    errors = list(_unstorable(job_in.model_dump()))
    if errors:
        raise RequestValidationError(errors)
    raw = job_in.model_dump(mode="json")
    raw["output_dir"] = str(settings.jobs_dir / job_id)
    raw["resources"] = {**(raw.get("resources") or {}), **settings.billing()}
    errors = _job_references(raw, settings)
    errors = errors or input_errors(raw, reader, settings.access)
    errors = errors or _not_folders(raw)
    if errors:
        raise RequestValidationError(errors)
    spec = _with_checkpoint_model(JobSpec.model_validate(raw))
    too_big = _check_size(spec, settings)
    if too_big is not None:
        raise RequestValidationError([too_big])
    return _plan_memory(spec, job_in, sharded=settings.runner == "ray").model_dump(mode="json")


def _plan_memory(spec: JobSpec, job_in: JobCreate, sharded: bool) -> JobSpec:
    """The spec with the memory measures the job will train with (`memory: auto`), or a 422 naming each training
    stage that fits no device of its tier, the device and the shortfall in GB. Planned for the service's runner
    (`sharded`: Ray, which shards a stage over its tier's devices; the local runner trains on one), as the runner
    plans it again when the job starts."""
    from moedisco.planning.memory_plan import MemoryFitError, resolve_memory

    # The client's training sections as sent, so that the planner knows which measures the user set.
    sent = spec.model_copy(update={section: getattr(job_in, section) for section in TRAIN_SECTIONS})
    try:
        return resolve_memory(sent, sharded=sharded)
    except MemoryFitError as refusal:
        raise RequestValidationError([error((section,), problem) for section, problem in refusal.problems.items()])


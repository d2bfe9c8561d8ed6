"""Turns a submitted spec into the spec the service runs, or a 422 naming every offending field.

    spec_dict = prepare_spec(job_in, job_id, settings)   # raises RequestValidationError

Pydantic has already checked types and ranges. On top of that the service puts the job in its own folder, keeps
input paths and object-storage URIs where MOEDISCO_DATA_DIR, MOEDISCO_INPUT_ROOTS and MOEDISCO_STORAGE_ROOTS allow,
refuses what JSON and PostgreSQL cannot hold, plans each training stage's memory and refuses an absurd model size;
`prepare_spec` lists each check.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError

from moedisco.config.loading import INPUT_PATHS
from moedisco.config.spec import JobSpec, ModelConfig
from moedisco.io.storage import is_under, is_uri
from moedisco.job.registry import STAGE
from service.core.config import Settings
from service.schemas import JobCreate

TRAIN_SECTIONS = tuple(dict.fromkeys(stage.train_config for stage in STAGE.values() if stage.trained))


def _error(loc: tuple, msg: str, value: Any = None) -> dict:
    return {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": str(value)}  # clipped when sent


def _unstorable(value: Any, loc: tuple = ()) -> Iterator[dict]:
    if isinstance(value, float) and not math.isfinite(value):
        yield _error(loc, "must be a finite number", value)
    elif isinstance(value, (str, Path)) and "\x00" in str(value):
        yield _error(loc, "must not contain NUL characters", value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _unstorable(key, (*loc, str(key)))
            yield from _unstorable(item, (*loc, str(key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _unstorable(item, (*loc, index))


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


URI_FIELDS = (("data", "train"), ("data", "eval"), ("resources", "storage_path"))  # the engine reads URIs there


def _check_uri(section: str, field: str, value: str, settings: Settings) -> dict | None:
    """An object-storage URI where the engine takes one, under one of MOEDISCO_STORAGE_ROOTS: the server's
    credentials would otherwise read and write any bucket they reach."""
    if (section, field) not in URI_FIELDS:
        return _error((section, field), "must be a path on the server: object-storage URIs are read only in "
                                        "data.train, data.eval and resources.storage_path", value)
    try:
        inside = any(is_under(value, root) for root in settings.storage_roots)  # by bucket and key segments
    except ValueError as error:
        return _error((section, field), f"not a plain object-storage URI: it {error}", value)
    if not inside:
        return _error((section, field), "an object-storage URI must lie under MOEDISCO_STORAGE_ROOTS "
                                        f"({', '.join(settings.storage_roots) or 'none set'})", value)
    return None


def _check_input(raw: dict, section: str, field: str, settings: Settings) -> dict | None:
    """Resolve one input path in place; return an error, or None."""
    value = raw[section].get(field)
    if value is None:
        return None
    if is_uri(value):
        return _check_uri(section, field, value, settings)
    try:
        path = (settings.data_dir / value).resolve()  # an absolute value replaces data_dir
        exists = path.exists()
    except (OSError, ValueError) as error:
        return _error((section, field), f"not a usable path ({error})", value)
    roots = settings.allowed_input_roots
    if not _inside(path, roots):
        return _error((section, field), "must be inside MOEDISCO_DATA_DIR or MOEDISCO_INPUT_ROOTS "
                                        f"({', '.join(map(str, roots))}); relative paths start at MOEDISCO_DATA_DIR",
                      value)
    if not exists:
        return _error((section, field), f"does not exist on the server ({path})", value)
    raw[section][field] = str(path)
    return None


def _check_storage(raw: dict, settings: Settings) -> dict | None:
    value = raw["resources"].get("storage_path")
    if value is None:
        return None
    if is_uri(value):
        return _check_uri("resources", "storage_path", value, settings)
    try:
        path = (settings.data_dir / value).resolve()
    except (OSError, ValueError) as error:
        return _error(("resources", "storage_path"), f"not a usable path ({error})", value)
    if not _inside(path, [settings.data_dir.resolve()]):
        return _error(("resources", "storage_path"), "must be inside MOEDISCO_DATA_DIR", value)
    raw["resources"]["storage_path"] = str(path)
    return None


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
    return _error(("model",), f"up to about {bound:.2g} parameters (hidden_size {model.hidden_size}, "
                              f"{model.num_hidden_layers} layers, {model.num_experts} experts): more than "
                              f"MOEDISCO_MAX_MODEL_PARAMETERS ({settings.max_model_parameters:.2g})", model.hidden_size)


def prepare_spec(job_in: JobCreate, job_id: str, settings: Settings) -> dict:
    """The spec to run, as a dict; a RequestValidationError naming every offending field. The service:
      - puts the job in MOEDISCO_DATA_DIR/jobs/<id>/, whatever `output_dir` the client sent (it never escapes);
      - keeps `resources.storage_path` (where the Ray runner writes checkpoints) inside MOEDISCO_DATA_DIR;
      - accepts an object-storage URI where the engine does (data.train, data.eval, resources.storage_path) when it
        lies under MOEDISCO_STORAGE_ROOTS, and refuses one elsewhere;
      - resolves input paths (data, tokenizer, models) against MOEDISCO_DATA_DIR, requires them to exist and to lie
        inside MOEDISCO_DATA_DIR or MOEDISCO_INPUT_ROOTS, so a token holder cannot read arbitrary server files;
      - refuses NaN/infinity and NUL characters, which JSON responses and PostgreSQL cannot hold;
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
    checks = [_check_input(raw, section, field, settings) for section, field in INPUT_PATHS]
    errors = [error for error in (*checks, _check_storage(raw, settings)) if error is not None]
    if errors:
        raise RequestValidationError(errors)
    spec = JobSpec.model_validate(raw)
    error = _check_size(spec, settings)
    if error is not None:
        raise RequestValidationError([error])
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
    except MemoryFitError as error:
        raise RequestValidationError([_error((section,), problem) for section, problem in error.problems.items()])


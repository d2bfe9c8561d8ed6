"""A job spec from what users and earlier versions write: YAML files, `--set` overrides, saved folders.

    spec = load_spec("examples/tiny.yaml", ["submodel.steps=50"])   # SpecError names the offending field
    spec = build_spec(raw_dict)                                        # the same from a dict (the API, tests)
    spec = build_spec(upgrade_saved_spec(saved))                       # a spec an earlier moedisco saved

The spec itself, every section and field, is `moedisco.config.spec`; this module turns input into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moedisco.config.architectures import REGISTRY
from moedisco.config.spec import JobSpec, ModelConfig
from moedisco.io.storage import is_uri

# (section, field) of every spec path a job reads: resolved against the spec's folder here, made absolute by
# `moedisco submit`, checked against the allowed input roots by the service.
INPUT_PATHS = (("data", "train"), ("data", "eval"), ("tokenizer", "path"), ("embed", "model_path"),
               ("model", "pretrained"), ("extend", "base"), ("retire", "base"))


class SpecError(ValueError):
    """A job spec that cannot be loaded; the message names the offending field."""


# What a spec saved in full by an earlier moedisco meant by a field it did not have yet (what that version did),
# where that differs from the field's default today. `outer_optimizer` predates its `nesterov` default: versions
# without the field averaged.
BEFORE_FIELD_EXISTED = {("branch", "sync_rounds"): 1, ("branch", "outer_optimizer"): "average"}


def upgrade_saved_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """A full spec saved by an earlier moedisco (a job's spec.yaml, the service's stored spec), with each field it
    predates set to what that version did, so that resuming the job keeps its meaning. Not for specs users write,
    where a missing field means its default."""
    raw = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for (section, key), value in BEFORE_FIELD_EXISTED.items():
        raw.setdefault(section, {}).setdefault(key, value)
    return raw


def _parse_scalar(text: str) -> Any:
    # YAML parsing gives `--set a.b=3e-4` a float, `=true` a bool and `=[1,2]` a list, like the YAML file itself.
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a raw spec dict (in place) and return it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"override {item!r} must look like key.path=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[leaf] = _parse_scalar(value)
    return raw


def _format_errors(error: ValidationError) -> str:
    lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(spec)'}: {err['msg']}" for err in error.errors()]
    return "invalid job spec:\n" + "\n".join(lines)


def build_spec(raw: dict[str, Any], base_dir: Path | None = None) -> JobSpec:
    """Validate a raw dict; relative input paths are resolved against `base_dir` when they exist there, and then
    every path is made absolute (`absolute_paths`)."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(_format_errors(error)) from None
    if base_dir is not None:
        _resolve_inputs(spec, base_dir)
        spec = absolute_paths(spec)
    return spec


SPEC_PATHS = (*INPUT_PATHS, ("resources", "storage_path"))  # besides `output_dir`


def absolute_paths(spec: JobSpec) -> JobSpec:
    """A copy of `spec` whose paths are absolute, against this process's working directory. Done once, where a
    spec is accepted (the CLI, the runner): a relative `output_dir` would otherwise mean another folder in every
    pod or Ray worker with its own working directory."""
    output_dir = spec.output_dir if is_uri(spec.output_dir) else Path(spec.output_dir).absolute()
    spec = spec.model_copy(deep=True, update={"output_dir": output_dir})
    for section, field in SPEC_PATHS:
        obj = getattr(spec, section)
        path = getattr(obj, field, None)  # an optional section (`extend`) may be unset
        if path is not None and not is_uri(path) and not path.is_absolute():
            setattr(obj, field, path.absolute())
    return spec


def with_pretrained_arch(spec: JobSpec) -> JobSpec:
    """`model.arch` from the pretrained MoE checkpoint's config.json (a dense one, upcycled, keeps the spec's), and
    the spec's architecture checks run again for it (`JobSpec._architecture_fits`); a ValueError when the spec
    names another architecture. Reads one JSON file: the service calls it without loading model code."""
    pretrained = spec.model.pretrained
    found = _checkpoint_type(pretrained) if pretrained is not None else None
    if found is None or found not in REGISTRY or found == spec.model.arch:
        return spec
    if spec.model.arch != ModelConfig.model_fields["arch"].default:  # the default is what leaving it out gives
        raise ValueError(f"model.arch is {spec.model.arch!r} but model.pretrained {pretrained} is a {found} "
                         "checkpoint: leave model.arch out, or make it match")
    checked = spec.model_copy(update={"model": spec.model.model_copy(update={"arch": found})}, deep=True)
    return checked._architecture_fits()


def _checkpoint_type(folder: Path) -> str | None:
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):  # no folder yet, or not a model's config: the source stage says so
        return None


def resolve_relative(path: Path, base_dir: Path) -> Path:
    """`path` as given when it is absolute or exists here, else `base_dir / path` when that exists.

    Paths in a YAML are relative to the working directory, but fall back to the YAML's folder so that
    `moedisco run /elsewhere/spec.yaml` (and `moedisco submit`) find data that lives beside the spec."""
    if is_uri(path):
        return path
    if not path.is_absolute() and not path.exists() and (base_dir / path).exists():
        return base_dir / path
    return path


def _resolve_inputs(spec: JobSpec, base_dir: Path) -> None:
    for section, field in INPUT_PATHS:
        obj = getattr(spec, section)
        path = getattr(obj, field, None)
        if path is not None:
            setattr(obj, field, resolve_relative(path, base_dir))


def load_saved_spec(path: Path) -> JobSpec:
    """The spec a job folder saved (`spec.yaml`), as that version of moedisco meant it (`upgrade_saved_spec`)."""
    return build_spec(upgrade_saved_spec(yaml.safe_load(path.read_text())))


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load a YAML job spec, apply `--set` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of sections")
    return build_spec(apply_overrides(raw, overrides or []), base_dir=path.parent)

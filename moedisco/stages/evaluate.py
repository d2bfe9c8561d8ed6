"""Downstream tasks (paper Table 2) scored by EleutherAI's lm-evaluation-harness, offline: the evaluate stage.

    scores = evaluate_model(Path("runs/tiny/final"), EvaluateConfig(tasks=["next_paragraph"], limit=100))
    scores["next_paragraph"]["acc"]         # accuracy, with "acc_stderr", "acc_norm", "num_fewshot", "samples"
    summary = stage_evaluate(run)           # the stage: OUTPUT/evaluation.json for final/ (and a baseline)

lm-eval's `HFLM` does the scoring, one `simple_evaluate` call per task so each gets its own few-shot count; task
definitions come from lm-eval, from `examples/eval` (the bundled `next_paragraph`) and from `task_dirs`. Nothing is
downloaded: the hub is switched offline before lm-eval is imported, and a task whose data is not in the local
datasets cache fails with `MissingTaskData`, naming it. (Held-out loss is `moedisco.training.heldout`.)
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from moedisco.config.spec import EvaluateConfig
from moedisco.stages.stage_run import StageRun
from moedisco.training.memory import resolve_device

log = logging.getLogger(__name__)

BUNDLED_TASKS = Path(__file__).resolve().parents[2] / "examples" / "eval"
PAPER_FEWSHOT = {"arc_easy": 5, "mmlu": 5, "hellaswag": 0, "piqa": 0}  # paper Table 2
PAPER_FOLDERS = {"arc_easy": "arc", "mmlu": "mmlu", "hellaswag": "hellaswag", "piqa": "piqa"}  # in lm_eval/tasks


class MissingTaskData(RuntimeError):
    """A task's dataset is not available locally (and is never downloaded)."""


def _offline(cfg: EvaluateConfig) -> None:
    """No hub access from here on, whatever was imported before; the datasets cache is `cfg.datasets_cache`."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if cfg.datasets_cache is not None:
        os.environ["HF_DATASETS_CACHE"] = str(cfg.datasets_cache)
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read these at import time; setting them again covers an earlier import in this process.
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True
    if cfg.datasets_cache is not None:
        datasets.config.HF_DATASETS_CACHE = Path(cfg.datasets_cache)


@contextmanager
def _rng_state_kept():
    """lm-eval seeds Python's, NumPy's and torch's global generators; the caller's state comes back afterwards, so
    an evaluation changes nothing that runs after it in the process."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def load_for_eval(model_dir: Path, device: torch.device):
    """(model, tokenizer) of a Hugging Face model folder, in eval mode; bf16 on CUDA, fp32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a model folder such as a job's final/)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return model.to(device).eval(), tokenizer


def _scores(results: dict, task: str, num_fewshot: int | None) -> dict:
    """The task's metrics as `{"acc": ..., "acc_stderr": ...}` (lm-eval keys them "acc,none", "acc_stderr,none")."""
    raw = results["results"][task]
    scores = {key.split(",")[0]: value for key, value in raw.items()
              if "," in key and isinstance(value, (int, float))}
    samples = results.get("n-samples", {}).get(task, {}).get("effective")
    return {**scores, "num_fewshot": num_fewshot, "samples": samples}


def _evaluate_task(lm, task: str, cfg: EvaluateConfig, task_manager) -> dict:
    from lm_eval import simple_evaluate

    num_fewshot = cfg.num_fewshot.get(task, PAPER_FEWSHOT.get(task))
    try:
        with _rng_state_kept():
            results = simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=cfg.limit,
                                      task_manager=task_manager, log_samples=False, bootstrap_iters=0,
                                      verbosity="WARNING")
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
        if "offline" in str(error).lower() or "cache" in str(error).lower() or "hub" in str(error).lower():
            raise MissingTaskData(
                f"task {task!r}: its dataset is not in the local datasets cache "
                f"({cfg.datasets_cache or os.environ.get('HF_DATASETS_CACHE', '~/.cache/huggingface/datasets')}) and "
                "nothing is downloaded at run time. Fill the cache once where the hub is reachable "
                "(`lm_eval --tasks <task> --limit 1` or datasets.load_dataset), then point "
                f"evaluate.datasets_cache at it. Cause: {error}") from error
        raise
    return _scores(results, task, num_fewshot)


def task_manager(cfg: EvaluateConfig):
    """lm-eval's index of the tasks asked for. Indexing all of lm-eval's own tasks takes a minute, so only the
    paper's folders and ours are read, unless a task is found in neither."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    missing = [str(folder) for folder in cfg.task_dirs if not folder.is_dir()]
    if missing:
        raise FileNotFoundError(f"evaluate.task_dirs: {', '.join(missing)} is not a folder")
    builtin = Path(lm_eval.tasks.__file__).parent
    folders = [builtin / PAPER_FOLDERS[task] for task in cfg.tasks if task in PAPER_FOLDERS]
    folders += [BUNDLED_TASKS] if BUNDLED_TASKS.is_dir() else []  # in a checkout of the repository
    folders += list(cfg.task_dirs)
    manager = TaskManager(include_path=[str(folder) for folder in folders], include_defaults=False)
    if not set(cfg.tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=[str(folder) for folder in folders])
    unknown = [task for task in cfg.tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"evaluate.tasks: unknown lm-eval task(s) {', '.join(unknown)}; known ones include "
                         f"{', '.join(sorted(set(PAPER_FEWSHOT) | {'next_paragraph'}))} (see `lm_eval ls tasks`)")
    return manager


def evaluate_model(model_dir: Path, cfg: EvaluateConfig) -> dict[str, dict]:
    """Task name -> its scores, for the model saved in `model_dir`."""
    _offline(cfg)
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(cfg)
    device = resolve_device(cfg.device)
    model, tokenizer = load_for_eval(model_dir, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device))
    return {task: _evaluate_task(lm, task, cfg, manager) for task in cfg.tasks}


def evaluate_models(models: dict[str, Path], cfg: EvaluateConfig) -> dict:
    """The evaluation record of a job: `{"tasks": [...], "limit": ..., "models": {label: {task: scores}}}`."""
    scored = {label: evaluate_model(folder, cfg) for label, folder in models.items()}
    return {"tasks": list(cfg.tasks), "limit": cfg.limit, "models": scored,
            "paths": {label: str(folder) for label, folder in models.items()}}


def stage_evaluate(run: StageRun) -> dict:
    """Downstream tasks (spec section `evaluate`) on final/, and on `baseline` when set; writes
    OUTPUT/evaluation.json. lm-eval is imported only here: a job without the section never loads it."""
    from moedisco.stages.evaluate import evaluate_models

    spec, paths, cfg = run.spec, run.paths, run.spec.evaluate
    started = time.perf_counter()
    models = {spec.method: paths.final, **({"baseline": cfg.baseline} if cfg.baseline is not None else {})}
    record = evaluate_models(models, cfg)
    seconds = time.perf_counter() - started
    paths.evaluation.write_text(json.dumps(record, indent=1))
    run.metrics.write({"stage": "evaluate", "step": 0, "scores": record["models"], "seconds": seconds})
    return {"scores": record["models"], "seconds": seconds}

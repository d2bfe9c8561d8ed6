"""The job spec: one pydantic model per paper stage, composed into `JobSpec`.

    spec = load_spec("examples/tiny.yaml", overrides=["submodel.steps=50"])   # moedisco.config.loading
    spec.model.num_experts  # -> 4

The spec is the single source of truth (the YAML a user writes, the JSON the REST API takes, the copy saved in the
output folder and next to every checkpoint), and its defaults follow the paper: submodels train with AdamW, lr 1e-4,
constant schedule (Table 4); the fine-tune and the full-parameter baseline with AdamW, lr 3e-4, warmup ratio 0.03,
weight decay 0.01 (Table 5), cosine for the baseline and warmup-stable-decay for the fine-tune.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from moedisco.config.architectures import REGISTRY
from moedisco.config.model import Architecture, ModelConfig  # noqa: F401 - the spec's `model` section
from moedisco.config.recipe import auto_recipe
from moedisco.config.resources import CPU_DEVICE_TYPE, DeviceSpec, ResourcesConfig, TierConfig, _Section  # noqa: F401
from moedisco.config.train import TrainConfig
from moedisco.io.atomic import write_atomically
from moedisco.io.storage import URI


class DataConfig(_Section):
    # A glob looks like `corpus/part-*.jsonl`. Files are streamed, except a .json array, read a whole file at a time.
    train: URI | Path = Field(description="Training corpus: a .jsonl/.json/.parquet/.txt file, folder or glob, local "
                              "or `s3://`/`gs://`.")
    format: Literal["auto", "jsonl", "json", "parquet", "text"] = Field(
        "auto", description="File format; `auto` picks it from the file extension."
    )
    text_field: str = Field("text", min_length=1, description="Field holding the document text in JSON/Parquet.")
    eval: URI | Path | None = Field(
        None, description="Separate held-out corpus (as `train`); when unset, `eval_fraction` is split off.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Fraction of documents held out for evaluation.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="Malformed lines: `raise` an error naming file and line, or `skip` and count them."
    )
    max_documents: int | None = Field(None, gt=0, description="Use at most this many documents (for quick runs).")
    # A shard is what one actor of a data stage's pool works on at a time: the pools grow to one actor per node up
    # to the shards there are, and a train split of one shard runs in one process.
    rows_per_shard: int = Field(4096, ge=1, description="Ray: documents per Parquet shard of the corpus, the data "
                                "stages' unit of work.")
    sequence_length: int = Field(256, ge=8, le=131072, description="Tokens per packed training sequence.")


class TokenizerConfig(_Section):
    path: Path | None = Field(None, description="Local Hugging Face tokenizer folder; unset trains a byte-level BPE.")
    vocab_size: int = Field(4096, ge=300, le=1_000_000, description="Vocabulary size of the trained BPE tokenizer.")
    # A cap, so that training the tokenizer takes bounded memory and time however large the corpus.
    sample_documents: int = Field(
        50_000, ge=1, description="The BPE is trained on the first this many training documents; unused with `path`."
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")


class EmbedConfig(_Section):
    model_path: Path | None = Field(
        None, description="Local embedding model folder; unset uses the bundled all-MiniLM-L6-v2 (offline)."
    )
    mode: Literal["token_mean", "sentence"] = Field(
        "token_mean",
        description="`token_mean`: mean input-layer embedding of the tokens (paper eq. 1); `sentence`: the encoder "
        "output.",
    )
    batch_size: int = Field(64, ge=1, description="Documents per embedding batch.")
    max_length: int = Field(256, ge=8, le=8192, description="Tokens of each document seen by the embedder.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device for the embedding model.")


class ClusterConfig(_Section):
    # `field`: the domains are declared, not found: no embedding and no k-means; the router still starts from each
    # domain's centroid (`merge.router_init: centroid`).
    method: Literal["kmeans", "balanced_kmeans", "random", "field"] = Field(
        "kmeans", description="`kmeans` (paper), `balanced_kmeans` (sizes bounded, as c-BTM), `random` (ablation) "
        "or `field` (a document field names its expert).",
    )
    field: str | None = Field(None, min_length=1, description="`field`: the document field (JSON/Parquet) that "
                              "names each document's domain.")
    domains: list[str] | None = Field(
        None, min_length=1, description="`field`: the domain of each expert, in order; unset: the field's distinct "
        "values, sorted.")
    normalize: bool = Field(True, description="L2-normalise embeddings before clustering (cosine geometry).")
    n_init: int = Field(4, ge=1, le=100, description="k-means restarts; the best objective is kept.")
    balance_slack: float = Field(
        0.25, ge=0.0, le=10.0, description="balanced_kmeans: no cluster exceeds (1 + slack) x N / K documents."
    )

    @model_validator(mode="after")
    def _field_named(self) -> ClusterConfig:
        if self.method == "field" and self.field is None:
            raise ValueError("cluster.method 'field' needs cluster.field: the document field naming the domain")
        if self.domains is not None and self.method != "field":
            raise ValueError(f"cluster.domains is read only with cluster.method 'field', not '{self.method}'")
        if self.domains is not None and len(set(self.domains)) != len(self.domains):
            raise ValueError(f"cluster.domains has repeated names: {self.domains}")
        return self


def _submodel_defaults() -> TrainConfig:
    # Paper Table 4: AdamW, lr 1e-4, constant.
    return TrainConfig(lr=1e-4, schedule="constant", warmup_ratio=0.0)


def _finetune_defaults() -> TrainConfig:
    # Table 5's settings, but warmup-stable-decay instead of cosine: a checkpoint of its stable phase can be annealed
    # at any step (`moedisco.stages.finetune.anneal`), which is how the fine-tune's length is searched for
    # (BENCHMARKS §9).
    return TrainConfig(schedule="wsd")


class BranchConfig(_Section):
    # The warm-up runs on the cheap tier; 0 keeps the paper's recipe of branching straight from the initial model.
    warmup_steps: int = Field(
        0, ge=0, description="Steps of shared warm-up on the whole corpus before branching into submodels; 0 = none."
    )
    warmup_lr: float | None = Field(None, gt=0.0, le=1.0, description="Warm-up learning rate; unset = submodel.lr.")
    # `dense` trains one submodel (shared backbone + one expert), then every expert starts as a copy of its FFN; it
    # fits wherever a submodel fits. `moe` trains the full MoE with its router, so experts start different, but needs
    # a cheap-tier device that holds the whole MoE.
    warmup_model: Literal["dense", "moe"] = Field(
        "dense", description="What the warm-up trains: `dense` (one submodel, copied into every expert) or `moe`."
    )
    # With 0 only experts train (block coordinate descent over experts) and there is nothing to average at the merge.
    shared_lr_scale: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Learning-rate multiplier of the shared parameters while submodels train; 0 freezes the backbone.",
    )
    # After every round but the last, each submodel stops at a checkpoint, their shared parameters are averaged as
    # `merge.weighting` says and written back (see `outer_optimizer`), and training goes on; experts are never averaged.
    # With 1 (the paper's recipe) shared parameters meet only at the merge; more rounds keep backbones trained on
    # different clusters from drifting apart, which is what the merge loses with k-means clusters (BENCHMARKS.md).
    # Trainers need only the job's storage, no link to each other; each round ends at a barrier. The default is
    # lowered to submodel.steps when there are fewer steps.
    sync_rounds: int = Field(
        4, ge=1, description="Rounds the submodel steps are cut into, shared parameters synced between them; 1 = the "
        "paper's.",
    )
    # `nesterov` is SGD with Nesterov momentum on the pseudo-gradient (the round's start minus the average), its
    # momentum kept in the job folder; `average` is outer SGD with lr 1 and no momentum. The merge after the last
    # round is the plain average either way. Why `nesterov` is the default: BENCHMARKS.md, outer optimizer.
    outer_optimizer: Literal["average", "nesterov"] = Field(
        "nesterov",
        description="What a sync round writes back: `nesterov` (DiLoCo's outer step) or the plain `average`."
    )
    outer_lr: float = Field(0.7, gt=0.0, le=2.0, description="`nesterov`: outer learning rate (DiLoCo: 0.7).")
    outer_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="`nesterov`: outer momentum (DiLoCo: 0.9).")


class MergeConfig(_Section):
    # `fisher` weighs submodel k element by element with gamma_k x F_k: gamma_k is cluster k's sample share, F_k its
    # diagonal Fisher estimate, AdamW's second moment, saved next to its weights (half their size again on disk).
    # `samples` is gamma_k alone (the paper's WP-SGD); `uniform` is 1/E. Why `fisher` is the default: BENCHMARKS.md.
    weighting: Literal["fisher", "samples", "uniform"] = Field(
        "fisher",
        description="Shared-parameter average: `fisher` (Fisher-weighted), `samples` (the paper's) or `uniform`."
    )
    # `centroid`: row k is the mean hidden state of cluster k's tokens; `concat`: the submodels' router rows;
    # `random`: a fresh initialisation. Why `centroid` is the default: BENCHMARKS.md.
    router_init: Literal["concat", "centroid", "random"] = Field(
        "centroid",
        description="Merged router rows: `centroid` (cluster mean hidden state), `concat` (paper) or `random`."
    )
    centroid_sequences: int = Field(16, ge=1, description="centroid: sequences per cluster used to estimate rows.")


class EvaluateConfig(_Section):
    """Downstream evaluation through lm-evaluation-harness (`moedisco.stages.evaluate`), the job's last stage."""

    # The paper's tasks are arc_easy, mmlu, hellaswag and piqa; their data must be in `datasets_cache`.
    tasks: list[str] = Field(
        default_factory=lambda: ["next_paragraph"], min_length=1,
        description="lm-eval task or group names: the paper's, the bundled next_paragraph, or any task of `task_dirs`.",
    )
    # The paper's: arc_easy 5, mmlu 5, hellaswag 0, piqa 0.
    num_fewshot: dict[str, int] = Field(
        default_factory=dict,
        description="Few-shot examples per task; others get the paper's count, else their default."
    )
    limit: int | None = Field(None, gt=0, description="At most this many examples per task (quick runs); unset: all.")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass.")
    task_dirs: list[Path] = Field(
        default_factory=list, description="Extra folders of lm-eval task YAML files (examples/eval is always read)."
    )
    # Nothing is ever downloaded: the tasks' data must be there already.
    datasets_cache: Path | None = Field(
        None, description="Local Hugging Face datasets cache holding the tasks' data; unset = HF_DATASETS_CACHE."
    )
    baseline: Path | None = Field(
        None, description="A baseline model folder (e.g. a full-parameter job's final/) scored on the same tasks."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device the models are scored on.")

    @field_validator("num_fewshot")
    @classmethod
    def _fewshot_non_negative(cls, value: dict[str, int]) -> dict[str, int]:
        negative = [task for task, shots in value.items() if shots < 0]
        if negative:
            raise ValueError(f"num_fewshot must be >= 0, not for {', '.join(negative)}")
        return value


class ExtendConfig(_Section):
    """`method: extend`: new experts for a new corpus (`data`), trained on the cheap tier from a finished model's
    backbone and merged into it (`moedisco.stages.extend`)."""

    # A job folder gives its final/ model, tokenizer and training data (replayed in the fine-tune); a bare model
    # folder needs its tokenizer inside and has no data to replay.
    base: Path = Field(description="The finished job folder (its final/ model) or Hugging Face MoE folder to extend.")
    new_experts: int = Field(1, ge=1, le=64, description="Experts added: the new corpus is clustered into this many.")
    # `frozen` leaves every old expert's computation as it was, so the old domains move only through the router.
    shared: Literal["frozen", "merge"] = Field(
        "frozen", description="Shared parameters: `frozen` (the base's) or `merge` (the base's and the new "
        "submodels', averaged as `merge.weighting` says).")
    finetune: Literal["router", "all"] = Field("router", description="What the brief fine-tune trains: the router "
                                               "rows only, or every parameter.")
    replay_fraction: float = Field(0.5, ge=0.0, lt=1.0, description="Share of each fine-tune batch drawn from the "
                                   "base job's training data (0 for a model folder).")


class RetireConfig(_Section):
    """`method: retire`: a finished model with experts removed, their router rows dropped (`moedisco.stages.retire`)."""

    base: Path = Field(description="The finished job folder (its final/ model) or Hugging Face MoE folder.")
    experts: list[int] = Field(min_length=1, description="Indices of the experts to remove.")

    @field_validator("experts")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"retire.experts must be distinct indices >= 0, got {value}")
        return sorted(value)


class JobSpec(_Section):
    name: str = Field("moedisco-job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="Job name.")
    method: Literal["moe_disco", "full_parameter", "extend", "retire"] = Field(
        "moe_disco", description="`moe_disco` (split, train submodels, merge, fine-tune), the `full_parameter` "
        "baseline, or `extend` / `retire` a finished model's experts.",
    )
    # An `s3://` / `gs://` URI is worked on in a local staging folder and copied up after every stage
    # (moedisco.io.storage).
    output_dir: URI | Path = Field(description="Folder or `s3://`/`gs://` URI for every artifact; re-running on it "
                                   "resumes the job.")
    seed: int = Field(0, ge=0, description="Seed for data split, initialisation, clustering and training.")
    # The rule and the grid it is fitted to: moedisco.config.recipe, BENCHMARKS §9.
    recipe: Literal["manual", "auto"] = Field(
        "manual", description="`auto`: submodel.batch_size and .steps, branch.sync_rounds and finetune.steps chosen "
        "from the baseline budget (full_parameter.steps x batch_size) by the fitted rule, whatever they say.")
    max_cost_usd: float | None = Field(None, gt=0, description="Budget: stop at a stage boundary before exceeding it.")
    # Unset only for `method: retire`, which trains nothing.
    data: DataConfig | None = Field(
        None, validate_default=True,
        description="Training corpus: where it is, how it is read and split, sequence length.")
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig,
        description="Tokenizer: a given one, or a byte-level BPE trained on the corpus."
    )
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="Document embeddings the clustering uses.")
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig,
        description="Clustering of the documents, one cluster per submodel (expert or group)."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="The MoE model: architecture and sizes, or a pretrained checkpoint."
    )
    branch: BranchConfig = Field(default_factory=BranchConfig, description="How submodels branch off.")
    submodel: TrainConfig = Field(default_factory=_submodel_defaults, description="Submodel training (cheap tier).")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="How the submodels are merged into one MoE.")
    finetune: TrainConfig = Field(default_factory=_finetune_defaults, description="Global fine-tune (expensive tier).")
    full_parameter: TrainConfig = Field(default_factory=TrainConfig, description="Full-parameter baseline training.")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Tiers, devices, prices and Ray settings the stages run with."
    )
    evaluate: EvaluateConfig | None = Field(
        None, description="Downstream tasks scored after training (lm-evaluation-harness); unset: no such stage."
    )
    extend: ExtendConfig | None = Field(None, description="`method: extend`: the model to extend and how.")
    retire: RetireConfig | None = Field(None, description="`method: retire`: the model and the experts to remove.")

    @property
    def num_clusters(self) -> int:
        """Clusters of this job's corpus, one submodel each: every group of `model.experts_per_submodel` experts, or
        an extension's new experts."""
        if self.method == "extend":
            return self.extend.new_experts
        return self.model.num_experts // self.model.experts_per_submodel

    @model_validator(mode="after")
    def _method_section(self) -> JobSpec:
        for method in ("extend", "retire"):
            if self.method == method and getattr(self, method) is None:
                raise ValueError(f"method '{method}' needs the `{method}` section (at least `{method}.base`)")
        if self.method in ("extend", "retire") and self.model.experts_per_submodel != 1:
            raise ValueError(f"method '{self.method}' adds or removes single experts: model.experts_per_submodel "
                             "must be 1")
        if self.method == "extend" and self.recipe == "auto":
            raise ValueError("recipe 'auto' sizes a whole MoE-DisCo job from its baseline budget; an extension's "
                             "steps are set by hand (submodel.steps, finetune.steps)")
        if self.cluster.domains is not None and len(self.cluster.domains) != self.num_clusters:
            count = ("extend.new_experts" if self.method == "extend" else "model.num_experts"
                     if self.model.experts_per_submodel == 1 else "model.num_experts / experts_per_submodel")
            raise ValueError(f"cluster.domains names {len(self.cluster.domains)} domains but {count} is "
                             f"{self.num_clusters}: one domain per submodel")
        if self.cluster.method == "field" and self.data is not None and self.data.format == "text":
            raise ValueError("cluster.method 'field' reads a field of each document: data.format 'text' has none")
        if self.method == "extend" and self.branch.sync_rounds > 1 and "sync_rounds" in self.branch.model_fields_set:
            raise ValueError("method 'extend' trains its new submodels in one round: branch.sync_rounds must be 1")
        return self

    @model_validator(mode="after")
    def _architecture_fits(self) -> JobSpec:
        """What the model's architecture allows (its registry entry); run again when `model.arch` is learnt from a
        checkpoint (`moedisco.models.experts.with_checkpoint_model`)."""
        least = REGISTRY[self.model.arch].min_group
        if self.method == "moe_disco" and self.model.experts_per_submodel < least:
            raise ValueError(f"model.experts_per_submodel must be at least {least} for {self.model.arch}: its router "
                             "sums the top two scores of each expert group, so a submodel routes among two experts "
                             "or more")
        dense_warmup = self.branch.warmup_steps and self.branch.warmup_model == "dense"
        if self.method == "moe_disco" and least > 1 and dense_warmup:
            raise ValueError(f"branch.warmup_model 'dense' trains a one-expert model, which {self.model.arch} cannot "
                             "route; use warmup_model 'moe'")
        if self.merge.router_init == "centroid" and not REGISTRY[self.model.arch].linear_router:
            if "router_init" in self.merge.model_fields_set:
                raise ValueError(f"merge.router_init 'centroid' sets the rows of a linear router; {self.model.arch}'s "
                                 "router is not one: use 'concat' or 'random'")
            self.merge.router_init = "concat"  # the default, where it cannot apply
        return self

    @field_validator("data")
    @classmethod
    def _data_given(cls, value: DataConfig | None, info) -> DataConfig | None:
        method = info.data.get("method", "moe_disco")
        if value is None and method != "retire":
            raise ValueError(f"Field required (method '{method}' trains on it)")
        return value

    @field_validator("submodel", "finetune", mode="before")
    @classmethod
    def _over_section_defaults(cls, given: Any, info) -> Any:
        # A section written in part keeps its own defaults for the rest (the submodels' lr 1e-4 and constant
        # schedule, the fine-tune's wsd), not TrainConfig's.
        if not isinstance(given, dict):
            return given
        default = cls.model_fields[info.field_name].default_factory()
        return {**default.model_dump(include=default.model_fields_set), **given}

    @model_validator(mode="after")
    def _auto_recipe(self) -> JobSpec:  # before the checks below, which then check what it chose
        if self.recipe == "auto":
            chosen = auto_recipe(self.full_parameter.steps, self.full_parameter.batch_size, self.num_clusters,
                                 self.finetune.batch_size)
            self.submodel.batch_size, self.submodel.steps = chosen.submodel_batch, chosen.submodel_steps
            self.finetune.steps = chosen.finetune_steps
            self.branch.sync_rounds = chosen.sync_rounds
        return self

    @model_validator(mode="after")
    def _rounds_fit_steps(self) -> JobSpec:
        if "sync_rounds" not in self.branch.model_fields_set:  # an extension's submodels train in one round
            self.branch.sync_rounds = 1 if self.method == "extend" else min(self.branch.sync_rounds,
                                                                            self.submodel.steps)
        if self.branch.sync_rounds > self.submodel.steps:
            raise ValueError(f"branch.sync_rounds ({self.branch.sync_rounds}) exceeds submodel.steps "
                             f"({self.submodel.steps}): every round needs at least one step")
        return self

    @model_validator(mode="after")
    def _batches_split_evenly_over_workers(self) -> JobSpec:
        # A sharded (FSDP2) run gives each worker batch_size / workers rows, in micro-batches of micro_batch_size:
        # every worker must run the same number of forward passes, or the collectives of one wait forever.
        cheap, expensive = self.resources.workers_per_expert, self.resources.finetune_tier.num_devices
        for section, workers in (("submodel", cheap), ("finetune", expensive), ("full_parameter", expensive)):
            train: TrainConfig = getattr(self, section)
            if workers > 1 and train.batch_size % workers:
                raise ValueError(f"{section}.batch_size ({train.batch_size}) must be a multiple of the "
                                 f"{workers} workers that shard it")
            if workers > 1 and train.micro_batch_size and (train.batch_size // workers) % train.micro_batch_size:
                raise ValueError(f"{section}.micro_batch_size ({train.micro_batch_size}) must divide each of the "
                                 f"{workers} workers' {train.batch_size // workers} rows")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: Path) -> None:
        write_atomically(path, self.to_yaml())

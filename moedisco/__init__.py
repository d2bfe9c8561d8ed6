"""moedisco: train Mixture-of-Experts language models the cheap way (MoE-DisCo).

Packages, each depending only on those before it (tests/test_layers.py keeps the order):

    io/        files: object storage, atomic writes, documents, token shards
    config/    the job spec and its sections, loading it from YAML
    job/       what a job is: the stage registry and plan, its folder layout, events, metrics
    models/    the MoE architectures: configs, tensor roles, upcycling, layer-by-layer reading
    training/  the training loop, checkpoints, optimizers and memory measures, FSDP, preemption, held-out loss
    stages/    one file per paper stage, its algorithm and its stage function
    planning/  the memory plan, the cost estimate, the cost ledger
    runner/    running a job's plan through an executor, and its report
"""

__version__ = "0.1.0"

"""moedisco: train Mixture-of-Experts language models the cheap way (MoE-DisCo).

Stages, one module each: `data`, `embed`, `cluster`, `split`, `train`, `sync`, `merge`, `finetune`, `evaluate`,
`cost`, `estimate`, `report`. Around them: `stages` declares what the stages of a job are (and its plan),
`pipeline` holds each stage's function, `runner` runs a plan through an executor (in process here; on Ray in
`ray_cluster`), `layout` is the job folder, `events` what a running job says, `config` the job spec.
"""

__version__ = "0.1.0"

"""moedisco: train Mixture-of-Experts language models the cheap way (MoE-DisCo).

Stages, one module each: `data`, `embed`, `cluster`, `split`, `train`, `merge`, `finetune`, `evaluate`, `cost`,
`estimate`, `report`; `pipeline` and `runner` run them in order on one machine.
"""

__version__ = "0.1.0"

"""The Ray execution layer of moedisco: where and when each stage runs. It calls `moedisco/`, never re-implements it.

    from ray_cluster.cluster import start_local_cluster, stop_local_cluster
    from ray_cluster.orchestrate import run_job_on_ray

    address = start_local_cluster(num_cheap=2)          # head + 2 `gpu_type=4090` nodes + 1 `gpu_type=A100` node
    summary = run_job_on_ray(spec, address=address)     # the same summary as moedisco.runner.job_runner.run_job
    stop_local_cluster()

Modules: `cluster` (the simulated labelled cluster), `placement` (tiers, labels, storage folders), `data` (Ray Data
embedding and clustering), `prestart` (the job's launcher and data worker), `trainers` (Ray Train trainers pinned
by label), `worker` (the Ray Train worker around moedisco's stage), `tracking` (events from workers, expert states,
cancellation), `orchestrate` (`RayExecutor`: moedisco's `JobRunner` with each task placed on its tier).
`moedisco cluster ...` is in `moedisco_cli/cluster.py`.
Nothing is imported here, so `moedisco` commands that never touch Ray do not pay for importing it.
"""

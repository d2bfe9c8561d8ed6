"""The Ray execution layer of moedisco: where and when each task of a job runs on a labelled Ray cluster
(`orchestrate.run_job_on_ray`); it calls `moedisco/`, never re-implements it. Nothing is imported here, so that
commands that never touch Ray do not pay for importing it."""

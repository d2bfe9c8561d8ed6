"""moedisco's control plane: a REST API over a job store, with jobs run as detached Ray actors.

    moedisco serve                       # Ray Serve on a running (or a local simulated) Ray cluster
    moedisco serve --no-ray-serve        # plain uvicorn, for debugging
    moedisco submit examples/tiny.yaml && moedisco jobs && moedisco status ID --follow

Layout (after full-stack-fastapi-template's backend):
    core/config.py   settings from MOEDISCO_* environment variables
    core/db.py       SQLAlchemy engine (SQLite file by default, PostgreSQL by URL)
    models.py        tables: jobs (with their owner), stage states, events, cost rows, users, API tokens
    schemas.py       request and response bodies (JobCreate / JobPublic, UserCreate / UserAccount ...)
    specs.py         what the service adds to spec validation (job folder, input paths, finite numbers, size)
    store.py         reads and writes of the tables; recorder.py folds runner events into them
    users.py         users, hashed tokens, a user's spend this month and budget left
    limits.py        the request body limit (413) and what an error may echo of a value
    api/             deps.py (Annotated dependencies: the caller, their job), quotas.py (queue limit, budget at
                     submission) and one router per resource in api/routes/
    costs.py         the cost view (live rows, baseline, savings); report.py the HTML report; prometheus.py
    views.py         the polled views (a job, its cost) as JSON, rebuilt only when the job's version changes
    executor.py      the detached Ray actor that runs one job and writes its progress into the store
    dispatcher.py    the queue (start queued jobs up to a limit) and reconciliation of lost runners
    main.py          `create_app()`: the FastAPI app, importable and testable without Ray Serve
    serve.py         the Ray Serve deployments wrapping it: `service.serve:build_app`
    scripts/         start_postgres.sh: a throwaway PostgreSQL for the store tests

Its clients live a layer up, in `moedisco_cli/`: the commands (`serve`, `submit`, `jobs`, ...) and the API client;
test helpers (a live server, the service as a subprocess) are in `tests/helpers.py`.

The service holds no training logic: it calls `moedisco.runner.job_runner.run_job` or `ray_cluster.orchestrate.run_job_on_ray`.
"""

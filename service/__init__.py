"""moedisco's control plane: a REST API over a job store, with jobs run as detached Ray actors.

    moedisco serve                       # Ray Serve on a running (or a local simulated) Ray cluster
    moedisco serve --no-ray-serve        # plain uvicorn, for debugging
    moedisco submit examples/tiny.yaml && moedisco jobs && moedisco status ID --follow

    core/        settings (MOEDISCO_* variables) and the database engine
    schemas.py   request and response bodies, and the job states (which the CLI reads too)
    store/       the tables, the job store, users with their tokens and monthly budgets
    jobs/        a submitted spec made runnable, the queue and reconciler, the job actor, its events recorder
    reporting/   a job's cost, the polled views, the HTML report, Prometheus metrics
    api/         the /v1 router, its dependencies, quotas, request limits, and routes/ (one router per resource)
    main.py      `create_app()`: the FastAPI app, testable without Ray Serve
    serve.py     the Ray Serve deployments wrapping it (`service.serve:build_app`)
    scripts/     start_postgres.sh: a throwaway PostgreSQL for the store tests

Each part imports only the parts listed above it, and holds no training logic: a job actor calls
`moedisco.runner.job_runner.run_job` or `ray_cluster.orchestrate.run_job_on_ray`; the service's clients (the
commands and the API client) live a layer up, in `moedisco_cli/`.
"""

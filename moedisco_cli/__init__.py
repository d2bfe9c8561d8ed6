"""The top layer: the `moedisco` command line and its client of the REST API.

    moedisco run examples/tiny.yaml              # main.py: `run`, `estimate`, and every other command registered
    moedisco cluster start --cheap-nodes 2       # cluster.py
    moedisco serve                               # serve.py
    moedisco submit examples/tiny.yaml --follow  # jobs.py: submit, jobs, status, cost, cancel
    moedisco demo                                # demo.py: serve + submit + follow, what `make demo` runs

Modules: `main` (the typer app, the entry point), `common` (console, cost table, spec-file reading), `api_client`
(`ApiClient` over httpx), `progress` (a job's stages as a table or live bars, polled from the API), and one module
per command group above.

Layers depend downward only: `moedisco/` <- `ray_cluster/` <- `service/` <- `moedisco_cli/` (tests/test_layers.py
checks it). Ray and the server are imported inside the commands that need them, so `moedisco estimate` and
`moedisco run --runner local` never import either.
"""

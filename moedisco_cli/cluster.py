"""`moedisco cluster ...`: a local simulated heterogeneous cluster for one machine.

    moedisco cluster start                     # a head alone; Ray's autoscaler adds nodes as work asks, removes idle
    moedisco cluster start --max-nodes cheap-4090=4 --idle-timeout 20   # up to 4 cheap nodes at once
    moedisco cluster start --static --cheap-nodes 4   # head + 4 x gpu_type=4090 + 1 x A100 + 1 x cpu, all up now
    moedisco run examples/tiny.yaml --runner ray --address auto
    moedisco cluster status [--address ADDR]
    moedisco cluster stop

`ray_cluster` is imported inside each command, so that `moedisco` commands that never touch Ray do not import it.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from moedisco_cli.common import console

cluster_app = typer.Typer(help="A local simulated Ray cluster with labelled cheap and expensive nodes.",
                          no_args_is_help=True)


@cluster_app.command()
def start(cheap_nodes: Annotated[int | None, typer.Option(help="With --static: nodes of the cheap tier (2).",
                                                         min=1)] = None,
          expensive_nodes: Annotated[int | None, typer.Option(help="With --static: nodes of the expensive tier (1).",
                                                              min=0)] = None,
          label_key: Annotated[str, typer.Option(help="Node label naming the tier.")] = "gpu_type",
          cheap_label: Annotated[str, typer.Option(help="Label value of cheap nodes.")] = "4090",
          expensive_label: Annotated[str, typer.Option(help="Label value of expensive nodes.")] = "A100",
          cpus_per_node: Annotated[float, typer.Option(help="Logical CPUs per node (one trainer worker each).")] = 1.0,
          autoscale: Annotated[bool, typer.Option(
              "--autoscale/--static",
              help="Start the head alone and let Ray's autoscaler add nodes of the node groups "
              "(resources.node_groups) when work asks for their labels, and remove idle ones; --static starts "
              "every node now.")] = True,
          max_nodes: Annotated[list[str] | None, typer.Option(
              help="Most nodes of a node group at once, GROUP=N (repeatable); default: "
              "ray_cluster.simulated.LOCAL_MAX_NODES.")] = None,
          idle_timeout: Annotated[float | None, typer.Option(
              help="With --autoscale: seconds an idle node is kept; default resources.idle_timeout_s.", min=0)] = None,
          ) -> None:
    """Start the cluster in the background; it runs until `moedisco cluster stop`."""
    from ray_cluster import local_cluster as local

    if autoscale and (cheap_nodes is not None or expensive_nodes is not None):
        raise typer.BadParameter("the autoscaler adds the nodes; fixed node counts need --static (or use "
                                 "--max-nodes GROUP=N)", param_hint="--cheap-nodes/--expensive-nodes")
    cheap_nodes = 2 if cheap_nodes is None else cheap_nodes
    expensive_nodes = 1 if expensive_nodes is None else expensive_nodes
    spec = local.LocalClusterSpec(num_cheap=cheap_nodes, num_expensive=expensive_nodes, label_key=label_key,
                                  cheap_label=cheap_label, expensive_label=expensive_label,
                                  cpus_per_node=cpus_per_node, autoscale=autoscale, idle_timeout_s=idle_timeout,
                                  max_nodes={**local.LOCAL_MAX_NODES, **_group_counts(max_nodes or [])})
    try:
        address = local.start_local_cluster(detach=True, spec=spec)
    except (RuntimeError, TimeoutError) as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    state = local.read_state() or {}
    console.print(f"cluster up at [bold]{address}[/bold]; dashboard {state.get('dashboard')}\n"
                  f"run a job on it: moedisco run SPEC --runner ray --address {address}")
    if autoscale:
        console.print("autoscaling: the head alone for now; nodes come when work asks for their labels "
                      "(`moedisco cluster status` lists them by group)")
    if state.get("auth") == "token":
        from ray_cluster.auth import token_source

        console.print(f"Ray token authentication is on (the token: {token_source()}); other Ray clients need "
                      "RAY_AUTH_MODE=token, and the dashboard asks for the token (`ray get-auth-token`)")


@cluster_app.command()
def stop() -> None:
    """Stop the cluster started by `moedisco cluster start` (only its own processes)."""
    from ray_cluster import local_cluster as local

    console.print("stopped" if local.stop_local_cluster() else "no local cluster is running")


@cluster_app.command()
def status(address: Annotated[str | None, typer.Option(help="Cluster address; default: the local one.")] = None,
           watch: Annotated[float | None, typer.Option(
               help="Then print every node that arrives or leaves, polling every this many seconds, until Ctrl-C.",
               min=0.2)] = None,
           ) -> None:
    """Nodes of the cluster by node group, with their labels and logical resources, and the nodes an autoscaler
    (v2) has asked for that are not up yet; with --watch, the nodes as they come and go.

    A cluster with Ray token authentication wants RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); the local cluster's is sent without being asked."""
    import ray

    from ray_cluster import local_cluster as local
    from ray_cluster.auth import connect

    state = local.read_state()
    address = address or (state or {}).get("address")
    if address is None:
        console.print("no local cluster is running; pass --address for another one")
        raise typer.Exit(1)
    try:
        connect(address, token_expected=local.wants_token(address), log_to_driver=False, logging_level="ERROR")
    except ConnectionError as error:  # ray_cluster.auth.RayAuthError (the cluster wants a token) among them
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(1) from None
    try:
        from ray_cluster.autoscaling import launch_requests, pending_nodes

        nodes = local.describe_nodes()
        gcs_address = ray.get_runtime_context().gcs_address
        requests, starting = launch_requests(gcs_address), pending_nodes(gcs_address)
        _print_status(address, nodes, requests, starting)
        if watch is not None:
            _watch(nodes, watch)
    finally:
        ray.shutdown()


def _watch(nodes: list[dict], interval_s: float) -> None:
    """Print each node that arrives or leaves, with its group, until Ctrl-C."""
    from ray_cluster import local_cluster as local

    known = {node["node_id"]: node for node in nodes}
    console.print(f"watching (every {interval_s:g} s; Ctrl-C stops)")
    try:
        while True:
            time.sleep(interval_s)
            now = {node["node_id"]: node for node in local.describe_nodes()}
            stamp = time.strftime("%H:%M:%S")
            for node_id in now.keys() - known.keys():
                console.print(f"{stamp} [green]+[/green] {now[node_id]['group'] or '-'} {node_id[:12]}")
            for node_id in known.keys() - now.keys():
                console.print(f"{stamp} [red]-[/red] {known[node_id]['group'] or '-'} {node_id[:12]}")
            known = now
    except KeyboardInterrupt:
        pass


def _print_status(address: str, nodes: list[dict], requests: list[dict], starting: list[dict]) -> None:
    table = Table(title=f"cluster {address}")
    for column in ("group", "node", "labels", "resources"):
        table.add_column(column)
    for node in sorted(nodes, key=lambda node: node["group"]):
        table.add_row(node["group"] or "-", node["node_id"][:12],
                      " ".join(f"{k}={v}" for k, v in node["labels"].items()),
                      " ".join(_resource(k, v) for k, v in node["resources"].items() if k != "memory"))
    console.print(table)
    if requests or starting:
        console.print(_launch_table(requests, starting))


def _launch_table(requests: list[dict], starting: list[dict]) -> Table:
    table = Table(title="asked of the autoscaler, not up yet")
    for column in ("group", "nodes", "state", "since"):
        table.add_column(column)
    now = time.time()
    for request in requests:
        table.add_row(request["node_type"], str(request["count"]), request["state"].lower() + " launch"
                      + (f" ({request['details']})" if request["details"] else ""),
                      f"{now - request['request_ts_s']:.0f} s ago")
    for node in starting:
        table.add_row(node["node_type"], "1", "starting" + (f" ({node['details']})" if node["details"] else ""), "")
    return table


def _group_counts(values: list[str]) -> dict[str, int]:
    """`GROUP=N` options as {group: N}, each group one of `resources.node_groups`."""
    from moedisco.config.resources import ResourcesConfig

    groups, counts = ResourcesConfig().node_groups, {}
    for value in values:
        group, _, count = value.partition("=")
        if group not in groups or not count.isdigit():
            raise typer.BadParameter(f"{value!r}: give GROUP=N, GROUP one of {', '.join(groups)}",
                                     param_hint="--max-nodes")
        counts[group] = int(count)
    return counts


def _resource(name: str, amount: float) -> str:
    return f"{name}={amount / 2**20:.0f}MB" if name == "object_store_memory" else f"{name}={amount:g}"

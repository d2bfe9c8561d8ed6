"""How `moedisco estimate` reads its measured hours and prints an estimate (`moedisco.planning.estimate`).

    hours = parse_hours(["submodel=2.09", "finetune=1.73", "full_parameter=9.87"])
    render_estimate(estimate_job(spec, hours=hours), Console())
"""

from __future__ import annotations

import math

from moedisco.planning.estimate import EstimateError


def parse_hours(items: list[str]) -> dict[str, float]:
    """`--hours STAGE=HOURS` options as {stage: hours}; which stages and values are valid, the estimate checks."""
    hours: dict[str, float] = {}
    for item in items:
        stage, sep, value = item.partition("=")
        stage = stage.strip()
        if not sep or not stage:
            raise EstimateError(f"--hours {item!r}: expected STAGE=HOURS, e.g. submodel=2.09")
        try:
            number = float(value)
        except ValueError:
            raise EstimateError(f"--hours {item!r}: {value.strip()!r} is not a number of hours") from None
        if stage in hours:
            raise EstimateError(f"--hours {item!r}: {stage} is given twice")
        if not math.isfinite(number):
            raise EstimateError(f"--hours {item!r}: hours must be finite")
        hours[stage] = number
    return hours


def render_estimate(result: dict, console) -> None:
    """Sizes, the memory table (as written, then as the job runs), the chosen measures, the host memory of the
    stages that build the whole model, and the cost."""
    from rich.table import Table

    counts = result["parameters"]
    group = result["experts_per_submodel"]
    submodels = f"{result['num_experts'] // group} submodels of {group} experts" if group > 1 else "submodel"
    console.print(f"[bold]{result['arch']}[/bold], {result['num_experts']} experts: "
                  f"{counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active, "
                  f"{submodels} {counts['submodel'] / 1e6:.2f}M "
                  f"({counts['submodel'] / counts['total']:.0%} of the MoE)")
    recipe = result["recipe"]
    console.print(f"recipe {recipe['recipe']}: {recipe['submodel_steps']} submodel steps in {recipe['sync_rounds']} "
                  f"rounds, {recipe['finetune_steps']} fine-tune steps, for a baseline of "
                  f"{recipe['full_parameter_steps']} steps")
    table = Table(title="memory per device (GB): as written, then as the job runs (`memory: auto` resolved)")
    for column in ("stage", "weights", "grads", "optimizer", "activations", "total", "device", "devices", "fits"):
        table.add_column(column)
    rows = [*result["memory"].items(), *((f"{name} (plan)", plan) for name, plan in result["plan"].items())]
    for name, plan in rows:
        table.add_row(name, *(f"{plan[k]:.2f}" for k in ("weights_gb", "gradients_gb", "optimizer_gb",
                                                        "activations_gb", "total_gb", "device_gb")),
                      str(plan["num_devices"]), "yes" if plan["fits"] else "[red]no[/red]")
    console.print(table)
    for name, plan in result["plan"].items():
        chosen = ", ".join(f"{k}={v}" for k, v in plan["measures"].items())
        console.print(f"{name} trains with {chosen}" + (f" [red]refused: {plan['refused']}[/red]"
                                                         if plan["refused"] else ""))
    render_host(result["host"], console)
    render_cost(result["cost"], console)


def render_host(host: dict, console) -> None:
    """One row per stage that holds a whole model in host memory (`source`): its needs against one node's."""
    from rich.table import Table

    table = Table(title="host memory per node (GB): stages that build the whole model outside training")
    for column in ("stage", "tier", "model (fp32)", "upcycled", "process", "total", "node", "fits"):
        table.add_column(column)
    for stage, plan in host.items():
        node = "unknown" if plan["node_memory_gb"] is None else f"{plan['node_memory_gb']:g}"
        upcycled = f"{plan['upcycled_gb']:.2f}" if plan["upcycled_gb"] else "-"
        table.add_row(stage, plan["tier"], f"{plan['model_gb']:.2f}", upcycled, f"{plan['process_gb']:.2f}",
                      f"{plan['total_gb']:.2f}", node, "yes" if plan["fits"] else "[red]no[/red]")
    console.print(table)
    for plan in host.values():
        if plan["refused"]:
            console.print(f"[red]refused: {plan['refused']}[/red]")  # the refusal names its stage


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def _usd(x: float) -> str:
    return f"${x:.2f}" if x >= 1 else f"${x:.3g}"


def _basis(entry: dict) -> str:
    """How a stage's hours were found: FLOPs per parameter and token x parameters x tokens, or measured (the
    efficiencies are in the table's title)."""
    if "flops" not in entry:
        return "measured"
    factor = "8 (recompute)" if entry["recompute"] else "6"
    return f"{factor} x {_count(entry['params'])} x {_count(entry['tokens'])} tokens"


def render_cost(cost: dict, console) -> None:
    """One row per priced stage (one submodel's run), then the job's total against the full-parameter baseline."""
    from rich.table import Table

    table = Table(title=f"cost ({cost['convention']}): {cost['model']}")
    for column in ("stage", "device", "hours", "$/h", "usd", "basis"):
        table.add_column(column)
    for stage, entry in cost["stages"].items():
        label = stage if stage != "submodel" else "submodel (each)"
        table.add_row(label, f"{entry['num_devices']} x {entry['device_type']}", f"{entry['hours']:.3g}",
                      f"{entry['price_per_hour']:g}", f"{entry['usd']:.4g}", _basis(entry))
    console.print(table)
    warmup = f"warm-up {_usd(cost['warmup_usd'])} + " if cost["stages"].get("warmup") else ""
    ratio = cost["ratio_to_full_parameter"]
    console.print(f"MoE-DisCo: {warmup}submodels {_usd(cost['submodels_usd'])} + fine-tune "
                  f"{_usd(cost['finetune_usd'])} = {_usd(cost['total_usd'])} in {cost['total_hours']:.3g} h; "
                  f"full-parameter baseline {_usd(cost['full_parameter_usd'])} in "
                  f"{cost['full_parameter_hours']:.3g} h" + (f" (ratio {ratio:.2f})" if ratio is not None else ""))

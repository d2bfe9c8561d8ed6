"""How `moedisco estimate` prints an estimate (`moedisco.planning.estimate.estimate_job`) as rich tables.

    render_estimate(estimate_job(spec), Console())
"""

from __future__ import annotations


def render_estimate(result: dict, console) -> None:
    """Sizes, the memory table (as written, then as the job runs), the chosen measures and the cost."""
    from rich.table import Table

    counts = result["parameters"]
    console.print(f"[bold]{result['arch']}[/bold], {result['num_experts']} experts: "
                  f"{counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active, "
                  f"submodel {counts['submodel'] / 1e6:.2f}M ({counts['submodel'] / counts['total']:.0%} of the MoE)")
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
    cost = result["cost"]
    console.print(f"cost ({cost['model']}): submodels ${cost['submodels_usd']:.2f} + fine-tune "
                  f"${cost['finetune_usd']:.2f} = ${cost['total_usd']:.2f}; full-parameter baseline "
                  f"${cost['full_parameter_usd']:.2f}")


"""`moedisco users ...` and `moedisco tokens ...`: users, their budgets and their API tokens, through the API.

    moedisco users create ada --budget 50 --max-queued 5     # prints ada's first token, once
    moedisco users list                                      # admins: everyone, with this month's spend
    moedisco users me                                        # your spend, budget and budget left this month
    moedisco users set ada --budget 80                       # --no-budget lifts it
    moedisco users revoke ada                                # every token of ada refused from now on
    moedisco tokens create ada --label laptop                # another token (yours, or anyone's as an admin)
    moedisco tokens list ada
    moedisco tokens revoke ada 3f2a9c1b7d4e

They read MOEDISCO_API_URL and MOEDISCO_API_TOKEN; managing others needs an admin's token (MOEDISCO_API_TOKEN of
the server is one).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from moedisco_cli.api_client import ApiClient
from moedisco_cli.common import api_call, console

users_app = typer.Typer(help="Users, their budgets and queue limits (admins; `me` for anyone).",
                        no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens of a user (admins, or the user).", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="User name (lower case letters, digits, . _ -).")]
BudgetOpt = Annotated[float | None, typer.Option("--budget", help="Monthly budget in dollars (UTC months).")]
QueuedOpt = Annotated[int | None, typer.Option("--max-queued", help="Jobs the user may have queued at once.")]


def _dollars(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def print_accounts(accounts: list[dict]) -> None:
    table = Table()
    for column in ("user", "admin", "budget/month", "spent this month", "left", "queued", "max queued", "revoked"):
        table.add_column(column)
    for user in accounts:
        table.add_row(user["name"], "yes" if user["is_admin"] else "", _dollars(user["monthly_budget_usd"]),
                      _dollars(user["month_spend_usd"]), _dollars(user["budget_left_usd"]), str(user["queued_jobs"]),
                      "-" if user["max_queued_jobs"] is None else str(user["max_queued_jobs"]),
                      (user["revoked_at"] or "")[:19].replace("T", " "))
    console.print(table)


def print_secret(token: dict) -> None:
    console.print(f"token [bold]{token['id']}[/bold] of {token['user']} (shown once, keep it):\n{token['token']}")


@users_app.command("create")
def create_user(name: NameArg, budget: BudgetOpt = None, max_queued: QueuedOpt = None,
                admin: Annotated[bool, typer.Option(help="May manage users and see every job.")] = False,
                token: Annotated[bool, typer.Option(help="Also create the user's first token.")] = True) -> None:
    """Add a user, and print their first API token."""
    client = ApiClient()
    api_call(client.create_user, name, is_admin=admin, monthly_budget_usd=budget, max_queued_jobs=max_queued)
    console.print(f"user [bold]{name}[/bold] created")
    if token:
        print_secret(api_call(client.create_token, name, "first"))


@users_app.command("list")
def list_users() -> None:
    """Every user, with this month's spend."""
    print_accounts(api_call(ApiClient().users))


@users_app.command("me")
def me() -> None:
    """Who your token is, and your spend and budget this month."""
    print_accounts([api_call(ApiClient().me)])


@users_app.command("set")
def set_limits(name: NameArg, budget: BudgetOpt = None, max_queued: QueuedOpt = None,
               no_budget: Annotated[bool, typer.Option(help="Remove the monthly budget.")] = False,
               no_max_queued: Annotated[bool, typer.Option(help="Use the service's default queue limit.")] = False,
               ) -> None:
    """Change a user's budget or queue limit."""
    limits = {key: value for key, value in (("monthly_budget_usd", budget), ("max_queued_jobs", max_queued))
              if value is not None}
    limits.update({"monthly_budget_usd": None} if no_budget else {})
    limits.update({"max_queued_jobs": None} if no_max_queued else {})
    print_accounts([api_call(ApiClient().update_user, name, **limits)])


@users_app.command("revoke")
def revoke_user(name: NameArg) -> None:
    """Refuse every token of the user from now on (their jobs are kept)."""
    api_call(ApiClient().revoke_user, name)
    console.print(f"user {name}: revoked, every token refused")


@tokens_app.command("create")
def create_token(name: NameArg,
                 label: Annotated[str | None, typer.Option(help="What it is for, e.g. `laptop`.")] = None) -> None:
    """A new token for the user, printed once."""
    print_secret(api_call(ApiClient().create_token, name, label))


@tokens_app.command("list")
def list_tokens(name: NameArg) -> None:
    """The user's tokens: ids, labels, dates (never the secrets)."""
    table = Table()
    for column in ("id", "label", "created", "revoked"):
        table.add_column(column)
    for token in api_call(ApiClient().tokens, name):
        table.add_row(token["id"], token["label"] or "", token["created_at"][:19].replace("T", " "),
                      (token["revoked_at"] or "")[:19].replace("T", " "))
    console.print(table)


@tokens_app.command("revoke")
def revoke_token(name: NameArg, token_id: Annotated[str, typer.Argument(help="From `moedisco tokens list`.")]) -> None:
    """Refuse the token from the next request on."""
    api_call(ApiClient().revoke_token, name, token_id)
    console.print(f"token {token_id} of {name}: revoked")

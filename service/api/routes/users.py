"""Users and their API tokens. Admins manage everyone; a user reads their own account and manages their own tokens.

    POST   /v1/users                          admin: {"name": "ada", "monthly_budget_usd": 50} -> 201 UserAccount
    GET    /v1/users                          admin: every user, with this month's spend
    GET    /v1/users/me                       the caller: spend this month, budget, budget left, jobs queued
    GET    /v1/users/{name}                   admin, or the user: the same
    PATCH  /v1/users/{name}                   admin: {"monthly_budget_usd": null} lifts the budget
    POST   /v1/users/{name}/revoke            admin: every token of the user refused from now on
    POST   /v1/users/{name}/tokens            admin, or the user: 201 {"token": "mdt_...", "id": ...}, shown once
    GET    /v1/users/{name}/tokens            admin, or the user: ids, labels, dates (never the secrets)
    DELETE /v1/users/{name}/tokens/{token_id} admin, or the user: refused from the next request on

Another user's account reads as missing (404), like another user's job.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Response, status
from fastapi import Path as PathParam

from service.api.deps import AdminDep, Caller, CallerDep, UsersDep
from service.schemas import (
    TOKEN_ID_PATTERN,
    USER_NAME_PATTERN,
    Message,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    UserAccount,
    UserCreate,
    UserLimits,
)
from service.store.models import BOOTSTRAP_ADMIN, UserRow
from service.store.users import UserExists, Users

router = APIRouter(prefix="/users", tags=["users"])

RESERVED_NAMES = (BOOTSTRAP_ADMIN, "me")  # the bootstrap admin's jobs' owner, and the caller's own account
UserPath = Annotated[str, PathParam(pattern=USER_NAME_PATTERN, description="A user's name.")]
TokenIdPath = Annotated[str, PathParam(pattern=TOKEN_ID_PATTERN, description="From the user's token list.")]
NOT_FOUND = {404: {"model": Message}}


def account(users: Users, user: UserRow) -> UserAccount:
    spend, budget = users.month_spend(user.name), user.monthly_budget_usd
    return UserAccount(name=user.name, is_admin=bool(user.is_admin), created_at=user.created_at,
                       revoked_at=user.revoked_at, monthly_budget_usd=budget, max_queued_jobs=user.max_queued_jobs,
                       month_spend_usd=spend, budget_left_usd=None if budget is None else budget - spend,
                       queued_jobs=users.count_queued(user.name))


def visible_user(users: Users, caller: Caller, name: str) -> UserRow:
    user = users.get_user(name) if caller.may_see(name) else None
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user {name!r}")
    return user


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UserAccount,
             responses={409: {"model": Message}})
def create_user(user_in: UserCreate, users: UsersDep, _: AdminDep) -> UserAccount:
    """Add a user (then give them a token: POST /v1/users/{name}/tokens)."""
    if user_in.name in RESERVED_NAMES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{user_in.name!r} is reserved")
    try:
        return account(users, users.create_user(**user_in.model_dump()))
    except UserExists:
        raise HTTPException(status.HTTP_409_CONFLICT, f"user {user_in.name!r} exists already") from None


@router.get("", response_model=list[UserAccount])
def list_users(users: UsersDep, _: AdminDep) -> list[UserAccount]:
    """Every user, by name, with this month's spend."""
    return [account(users, user) for user in users.list_users()]


@router.get("/me", response_model=UserAccount)
def read_me(users: UsersDep, caller: CallerDep) -> UserAccount:
    """The caller's account: this month's spend, budget and what is left of it, jobs queued."""
    # MOEDISCO_API_TOKEN's admin has no row, hence no limits.
    return account(users, users.get_user(caller.name) or UserRow(name=caller.name, is_admin=caller.is_admin))


@router.get("/{name}", response_model=UserAccount, responses=NOT_FOUND)
def read_user(name: UserPath, users: UsersDep, caller: CallerDep) -> UserAccount:
    return account(users, visible_user(users, caller, name))


@router.patch("/{name}", response_model=UserAccount, responses=NOT_FOUND)
def update_user(name: UserPath, limits: UserLimits, users: UsersDep, _: AdminDep) -> UserAccount:
    """Change a user's budget or queue limit; only the fields sent change, `null` removes a limit."""
    changes = limits.model_dump(exclude_unset=True)
    user = users.update_user(name, **changes) if changes else users.get_user(name)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user {name!r}")
    return account(users, user)


@router.post("/{name}/revoke", response_model=UserAccount, responses=NOT_FOUND)
def revoke_user(name: UserPath, users: UsersDep, _: AdminDep) -> UserAccount:
    """Refuse every token of the user from their next request on; their jobs are kept."""
    user = users.revoke_user(name)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no user {name!r}")
    return account(users, user)


@router.post("/{name}/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated,
             responses={**NOT_FOUND, 409: {"model": Message}})
def create_token(name: UserPath, token_in: TokenCreate, users: UsersDep, caller: CallerDep) -> TokenCreated:
    """A new token for the user; its secret is in this response only (the store keeps its sha256)."""
    user = visible_user(users, caller, name)
    if user.revoked_at is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"user {name!r} is revoked")
    token, secret = users.create_token(name, token_in.label)
    return TokenCreated(**TokenPublic.model_validate(token).model_dump(), token=secret)


@router.get("/{name}/tokens", response_model=list[TokenPublic], responses=NOT_FOUND)
def list_tokens(name: UserPath, users: UsersDep, caller: CallerDep) -> list[TokenPublic]:
    visible_user(users, caller, name)
    return [TokenPublic.model_validate(token) for token in users.list_tokens(name)]


@router.delete("/{name}/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
def revoke_token(name: UserPath, token_id: TokenIdPath, users: UsersDep, caller: CallerDep) -> Response:
    """Refuse the token from the next request on."""
    visible_user(users, caller, name)
    if not users.revoke_token(name, token_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {name!r} has no live token {token_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)

"""Users, their API tokens, and what a user may still spend or queue: the store's side of a shared service.

    users = Users(store)
    user = users.create_user("ada", monthly_budget_usd=50.0)
    token, secret = users.create_token("ada")     # `secret` is shown once; the store keeps its sha256
    users.authenticate(secret).name               # "ada"; None once the token or its user is revoked
    users.month_spend("ada"), users.budget_left("ada")

Every check reads the store (one primary-key read to authenticate), so a revoked token is refused on its next
request, by every API replica, with no cache to expire. A token's secret is 256 random bits, so its sha256 can be
looked up directly: there is nothing to brute-force and no per-token salt is needed.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from moedisco.planning.billing import accrued_usd
from service.store.billing import bill_inputs
from service.store.models import JobRow, NodeUseRow, StoredCost, TokenRow, UserRow, utcnow
from service.store.store import Store

DAY_S = 86400.0  # a use that ended this long before the month began has no node time left in it (idle timeouts
# are minutes)
TOKEN_PREFIX = "mdt_"  # says what a leaked secret is, so secret scanners and people can tell


class UserExists(ValueError):
    """There already is a user of that name."""


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def month_start(now: datetime) -> datetime:
    """The first instant of `now`'s calendar month (UTC): budgets are per calendar month."""
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class Users:
    def __init__(self, store: Store):
        self.store = store

    # --- users --------------------------------------------------------------------------------------------------

    def create_user(self, name: str, is_admin: bool = False, monthly_budget_usd: float | None = None,
                    max_queued_jobs: int | None = None) -> UserRow:
        user = UserRow(name=name, is_admin=is_admin, monthly_budget_usd=monthly_budget_usd,
                       max_queued_jobs=max_queued_jobs)
        try:
            with self.store.session() as session, session.begin():
                session.add(user)
        except IntegrityError:
            raise UserExists(name) from None
        return user

    def get_user(self, name: str) -> UserRow | None:
        with self.store.session() as session:
            return session.get(UserRow, name)

    def list_users(self) -> list[UserRow]:
        with self.store.session() as session:
            return list(session.scalars(select(UserRow).order_by(UserRow.name)).all())

    def update_user(self, name: str, **values) -> UserRow | None:
        """Set the given columns (e.g. monthly_budget_usd=None lifts the budget); None when there is no such user."""
        with self.store.session() as session, session.begin():
            result = session.execute(update(UserRow).where(UserRow.name == name).values(**values))
        return self.get_user(name) if result.rowcount == 1 else None

    def revoke_user(self, name: str) -> UserRow | None:
        """Refuse every token of the user from now on; their jobs are kept (an admin still sees them)."""
        now = utcnow()
        with self.store.session() as session, session.begin():
            session.execute(update(TokenRow).where(TokenRow.user == name, TokenRow.revoked_at.is_(None))
                            .values(revoked_at=now))
        return self.update_user(name, revoked_at=now)

    # --- tokens -------------------------------------------------------------------------------------------------

    def create_token(self, user: str, label: str | None = None) -> tuple[TokenRow, str]:
        """(the stored token, its secret): the secret exists only in this return value."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = TokenRow(sha256=token_hash(secret), id=secrets.token_hex(6), user=user, label=label)
        with self.store.session() as session, session.begin():
            session.add(token)
        return token, secret

    def list_tokens(self, user: str) -> list[TokenRow]:
        with self.store.session() as session:
            query = select(TokenRow).where(TokenRow.user == user).order_by(TokenRow.created_at, TokenRow.id)
            return list(session.scalars(query).all())

    def revoke_token(self, user: str, token_id: str) -> bool:
        """False when the user has no such token (or it was revoked already)."""
        with self.store.session() as session, session.begin():
            result = session.execute(update(TokenRow).where(TokenRow.user == user, TokenRow.id == token_id,
                                                            TokenRow.revoked_at.is_(None))
                                     .values(revoked_at=utcnow()))
        return result.rowcount == 1

    def authenticate(self, secret: str) -> UserRow | None:
        """The user whose live token `secret` is; None for an unknown or revoked token, or a revoked user."""
        query = (select(UserRow).join(TokenRow, TokenRow.user == UserRow.name)
                 .where(TokenRow.sha256 == token_hash(secret), TokenRow.revoked_at.is_(None),
                        UserRow.revoked_at.is_(None)))
        with self.store.session() as session:
            return session.scalars(query).first()

    # --- spend and limits ---------------------------------------------------------------------------------------

    def month_spend(self, user: str, now: datetime | None = None) -> float:
        """Dollars the user's jobs spent this calendar month (UTC): each job's billed node time since the month
        began (`service.store.billing`, as the cost view's `billed_usd`); a job with no node recorded (a local run)
        counts its priced stages."""
        now = now or utcnow()
        start = month_start(now)
        this_month = or_(StoredCost.priced_at >= start,
                         and_(StoredCost.priced_at.is_(None), JobRow.created_at >= start))
        with self.store.session() as session:
            compute = dict(session.execute(
                select(StoredCost.job_id, func.sum(StoredCost.usd)).join(JobRow, JobRow.id == StoredCost.job_id)
                .where(JobRow.owner == user, this_month).group_by(StoredCost.job_id)).all())
            recent = or_(NodeUseRow.end.is_(None), NodeUseRow.end >= start.timestamp() - DAY_S)
            with_uses = session.scalars(select(JobRow).where(
                JobRow.owner == user, JobRow.id.in_(select(NodeUseRow.job_id).where(recent)))).all()
        spend = sum(usd or 0.0 for usd in compute.values())
        for job in with_uses:
            inputs = bill_inputs(self.store, job)
            if inputs.recorded:  # the bill replaces the job's compute rows
                billed = accrued_usd(inputs.spans(now.timestamp()), since=start.timestamp())
                spend += billed - (compute.get(job.id) or 0.0)
        return spend

    def budget_left(self, user: str) -> float | None:
        """Dollars the user may still spend this month; None without a budget (or without a user row: the
        bootstrap admin)."""
        row = self.get_user(user)
        if row is None or row.monthly_budget_usd is None:
            return None
        return row.monthly_budget_usd - self.month_spend(user)

    def count_queued(self, user: str) -> int:
        with self.store.session() as session:
            return session.scalar(select(func.count()).where(JobRow.owner == user, JobRow.state == "queued")) or 0

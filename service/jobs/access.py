"""What a user's job may read and write: their own area, the shared area, their own jobs and their storage roots.

    errors = input_errors(spec_dict, reader_of("ada", is_admin=False, store=store), settings.access)

Under MOEDISCO_DATA_DIR each user has an area of their own, `users/<name>/`, and every user may read `shared/`, an
area an admin fills (as every folder of MOEDISCO_INPUT_ROOTS). A job's inputs (its corpus, tokenizer, embedding
model, pretrained model) may come from these, or from a folder of one of the submitter's own jobs (`jobs/<id>/final`
as a pretrained model); anything else under MOEDISCO_DATA_DIR (another user's area or job, the job store's own
file) does not exist for them. Its `resources.storage_path`, where the Ray runner writes, must be in the submitter's
area or one of their jobs. On object storage, a MOEDISCO_STORAGE_ROOTS prefix with `{user}` in it is each user's own
(readable and writable); one without is shared and read-only. An admin reads and writes every user's area and job.
The rules are applied when a job is submitted and again when its runner starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moedisco.config.loading import INPUT_PATHS
from moedisco.io.storage import is_under, is_uri
from service.core.config import AccessRules
from service.store.models import BOOTSTRAP_ADMIN
from service.store.store import Store
from service.store.users import Users

URI_FIELDS = (("data", "train"), ("data", "eval"), ("resources", "storage_path"))  # the engine reads URIs there
USER_PLACEHOLDER = "{user}"


@dataclass(frozen=True)
class Reader:
    """Who a job's paths are checked for: its submitter, and which jobs are theirs."""

    name: str
    is_admin: bool
    owns_job: Callable[[str], bool]  # job id -> whether it is this user's


def reader_of(name: str, is_admin: bool, store: Store) -> Reader:
    """`name` as a reader, their jobs read from the store."""
    def owns_job(job_id: str) -> bool:
        job = store.get_job(job_id)
        return job is not None and job.owner == name

    return Reader(name, is_admin, owns_job)


def owner_as_reader(store: Store, owner: str) -> Reader:
    """A job's owner as a reader, with their admin right as the store holds it now (a revoked admin has none)."""
    user = Users(store).get_user(owner)
    admin = owner == BOOTSTRAP_ADMIN or (user is not None and user.is_admin and user.revoked_at is None)
    return reader_of(owner, admin, store)


def error(loc: tuple, msg: str, value: Any = None) -> dict:
    return {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": str(value)}  # clipped when sent


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _job_of(path: Path, rules: AccessRules) -> str | None:
    """The job id of a path inside MOEDISCO_DATA_DIR/jobs/<id>/, else None."""
    if not path.is_relative_to(rules.jobs_dir) or path == rules.jobs_dir:
        return None
    return path.relative_to(rules.jobs_dir).parts[0]


def _own_place(path: Path, reader: Reader, rules: AccessRules) -> bool:
    """In the reader's area or one of their jobs (an admin: any user's area or job)."""
    if reader.is_admin and (path.is_relative_to(rules.users_dir) and path != rules.users_dir):
        return True
    job = _job_of(path, rules)
    return path.is_relative_to(rules.user_dir(reader.name)) or (
        job is not None and (reader.is_admin or reader.owns_job(job)))


def _readable(path: Path, reader: Reader, rules: AccessRules) -> bool:
    # Under MOEDISCO_DATA_DIR only its own rules hold, even where an input root encloses it (a root of `/srv` with
    # the data in `/srv/moedisco` must not open every user's area and the job store).
    outside_data = not path.is_relative_to(rules.data_dir) and _inside(path, list(rules.input_roots))
    return outside_data or path.is_relative_to(rules.shared_dir) or _own_place(path, reader, rules)


def _where(reader: Reader) -> str:
    return f"users/{reader.name}/ (yours), shared/, your own jobs' folders (jobs/<id>/) or MOEDISCO_INPUT_ROOTS"


def storage_roots(reader: Reader, rules: AccessRules, writable: bool) -> list[str]:
    """The object-storage prefixes `reader` may read (`writable` False) or write, `{user}` filled in."""
    roots = [root for root in rules.storage_roots if not writable or USER_PLACEHOLDER in root]
    return [root.replace(USER_PLACEHOLDER, reader.name) for root in roots]


def check_uri(loc: tuple[str, str], value: str, reader: Reader, rules: AccessRules) -> dict | None:
    """An object-storage URI where the engine takes one, under a prefix the reader may use: the server's
    credentials would otherwise read and write any bucket they reach."""
    if loc not in URI_FIELDS:
        return error(loc, "must be a path on the server: object-storage URIs are read only in "
                          "data.train, data.eval and resources.storage_path", value)
    writable = loc == ("resources", "storage_path")
    roots = rules.storage_roots if reader.is_admin else storage_roots(reader, rules, writable)
    shared = [root for root in rules.storage_roots if USER_PLACEHOLDER not in root]
    try:
        inside = any(is_under(value, root.replace(USER_PLACEHOLDER, reader.name)) for root in roots)
        # A user named like a shared prefix's last segment (`shared` under `s3://b/{user}` and `s3://b/shared`)
        # must not write into that shared prefix; admins manage the shared prefixes.
        inside = inside and (reader.is_admin or not (writable and any(is_under(value, root) for root in shared)))
    except ValueError as failure:
        return error(loc, f"not a plain object-storage URI: it {failure}", value)
    if not inside:
        kind = "your own prefixes of" if writable else "a prefix you may read in"
        return error(loc, f"an object-storage URI must lie under {kind} MOEDISCO_STORAGE_ROOTS "
                          f"({', '.join(roots) or 'none for you'})", value)
    return None


def resolve(value: str, rules: AccessRules) -> Path:
    """A spec's path on the server: relative to MOEDISCO_DATA_DIR, symbolic links followed."""
    return (rules.data_dir / value).resolve()  # an absolute value replaces data_dir


READ_FIELDS = (*INPUT_PATHS, ("evaluate", "baseline"), ("evaluate", "task_dirs"))  # a list: each item checked
WRITE_FIELDS = (("resources", "storage_path"), ("evaluate", "datasets_cache"))  # the job writes there


def _slots(raw: dict, fields: tuple) -> Iterator[tuple[tuple, dict | list, str | int]]:
    """(loc, holder, key) of every path a spec dict gives in `fields`, one per item of a list."""
    for section, field in fields:
        holder = raw.get(section) or {}
        value = holder.get(field)
        if isinstance(value, list):
            yield from (((section, field, index), value, index) for index in range(len(value)))
        elif value is not None:
            yield (section, field), holder, field


def _resolved(loc: tuple, value: str, rules: AccessRules) -> tuple[Path | None, dict | None]:
    try:
        return resolve(value, rules), None
    except (OSError, ValueError, RuntimeError) as failure:  # RuntimeError: a symbolic link loop
        return None, error(loc, f"not a usable path ({failure})", value)


def check_path(loc: tuple, holder: dict | list, key: str | int, reader: Reader, rules: AccessRules,
               writes: bool) -> dict | None:
    """One path of a spec (`holder[key]`), resolved in place when the reader may use it; else an error naming it.
    A path the job reads must be readable and exist; one it `writes` (`resources.storage_path`,
    `evaluate.datasets_cache`) must be the reader's own area or job, or own URI prefix."""
    value = holder[key]
    if is_uri(value):
        return check_uri(loc, value, reader, rules)
    path, failed = _resolved(loc, value, rules)
    if failed:
        return failed
    if writes and not _own_place(path, reader, rules):
        return error(loc, f"must be in users/{reader.name}/ or one of your jobs' folders under MOEDISCO_DATA_DIR",
                     value)
    if not writes and not _readable(path, reader, rules):  # said before whether it exists: not theirs to know
        return error(loc, f"must be in {_where(reader)}; relative paths start at MOEDISCO_DATA_DIR", value)
    if not writes and not path.exists():
        return error(loc, f"does not exist on the server ({path})", value)
    holder[key] = str(path)
    return None


def input_errors(raw: dict, reader: Reader, rules: AccessRules) -> list[dict]:
    """Every path a spec dict reads or writes, checked (and resolved in place) for `reader`; and for an extension or
    a retirement, every job its base was made from (`ancestry_errors`)."""
    checks = [check_path(*slot, reader, rules, writes=False) for slot in _slots(raw, READ_FIELDS)]
    checks += [check_path(*slot, reader, rules, writes=True) for slot in _slots(raw, WRITE_FIELDS)]
    found = [error for error in checks if error is not None]
    return found or ancestry_errors(raw, reader, rules)


BASE_FIELDS = (("extend", "base"), ("retire", "base"))


def ancestry_errors(raw: dict, reader: Reader, rules: AccessRules) -> list[dict]:
    """An extension replays, and both measure, the corpora of every job the base was made from, found through each
    job's spec.yaml (`moedisco.job.provenance.ancestry`): each must be the reader's to read too (checked before its
    spec.yaml is read), or a spec.yaml written into the reader's own area could lead to another user's job."""
    from moedisco.job.provenance import AncestryError, ancestry

    errors = []
    for section, field in BASE_FIELDS:
        value = (raw.get(section) or {}).get(field)
        if value is None or is_uri(value):
            continue
        try:
            ancestry(Path(value), may_read=lambda job: _readable(job, reader, rules))
        except PermissionError:
            errors.append(error((section, field), f"was made from a job outside what you may read: it must be in "
                                                  f"{_where(reader)}, as must every job it was made from", value))
        except AncestryError as failure:
            errors.append(error((section, field), f"a job it was made from cannot be followed: {failure}", value))
    return errors

"""Admin commands over garrison.v1.Admin: `garrison tenants|keys|quota|usage|audit ...`.

They need an admin key (default: the server data dir's admin.key, written on the first start).
Tables for people; `--json` prints the API's messages for scripts; `usage --csv` for spreadsheets.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from garrison.cli.numbers import INT32_MAX, INT64_MAX, integer
from garrison.cli.output import print_csv, print_json, print_table
from garrison.cli.remote import connect, connection_parent
from garrison.secret_files import write_secret_file
from garrison.tenancy import keys
from garrison.v1 import admin_pb2

ADMIN_KEY = "admin.key"
QUOTA_FLAGS = (  # flag, field, type, help
    ("--max-concurrent", "max_concurrent_requests", integer(0, INT32_MAX), "requests in flight at once (0: no limit)"),
    ("--tokens-per-minute", "tokens_per_minute", integer(0, INT64_MAX),
     "prompt + output tokens per sliding minute (0: no limit)"),
    ("--max-prompt-tokens", "max_prompt_tokens", integer(0, INT32_MAX), "longest prompt, in tokens (0: no limit)"),
    ("--max-new-tokens", "max_new_tokens", integer(0, INT32_MAX), "most tokens one request may generate (0: no limit)"),
    ("--priority-weight", "priority_weight", float, "share of the workers when they are saturated (default 1)"),
)


def register(commands: Any) -> Any:
    """Add the admin commands; returns `garrison keys`'s actions so other modules can add theirs (rotate-kek)."""
    connection = connection_parent()
    _tenants(commands, connection)
    keys = _keys(commands, connection)
    _quota(commands, connection)
    usage = commands.add_parser("usage", help="usage ledger: requests and tokens per tenant, model and hour",
                                parents=[connection],
                                description="Read the usage ledger (UTC hours). Times are ISO 8601, e.g. 2026-11-29T08:00Z.")
    usage.add_argument("--tenant", default="", help="one tenant (default: all)")
    usage.add_argument("--model", default="", help="one model (default: all)")
    usage.add_argument("--since", type=_time, help="first hour to include")
    usage.add_argument("--until", type=_time, help="hour to stop before")
    fmt = usage.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    usage.set_defaults(run=_usage)
    audit = commands.add_parser("audit", help="the audit log of admin actions", parents=[connection],
                                description="Print admin actions, oldest first (without --since: the latest).")
    audit.add_argument("--since", type=_time, help="first time to include (ISO 8601)")
    audit.add_argument("--limit", type=integer(0, INT32_MAX), default=0, help="at most this many events (0: 100)")
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(run=_audit)
    return keys


def _tenants(commands: Any, connection: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("tenants", help="create, list and delete tenants; grant models")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a tenant", parents=[connection])
    create.add_argument("name", help="1-63 lower-case letters, digits and '-'")
    create.add_argument("--models", default="", help="comma-separated models the tenant may use")
    _add_quota_flags(create)
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(run=_tenant_create)
    listing = sub.add_parser("list", help="list tenants with their models and limits", parents=[connection])
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_tenant_list)
    delete = sub.add_parser("delete", help="delete a tenant and revoke its keys (its usage is kept)",
                            parents=[connection])
    delete.add_argument("name")
    delete.set_defaults(run=lambda a: _admin_call(a, "delete_tenant", name=a.name) and 0)
    for action, verb in (("grant", "allow"), ("revoke", "stop")):
        p = sub.add_parser(action, help=f"{verb} a tenant's use of a model", parents=[connection])
        p.add_argument("tenant")
        p.add_argument("model")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(run=_grant, rpc=f"{action}_model")


def _keys(commands: Any, connection: argparse.ArgumentParser) -> Any:
    parser = commands.add_parser("keys", help="create, list and revoke API keys")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a key; its secret goes to stdout, once", parents=[connection],
                            description="Create an API key. Only the secret is printed on stdout (so "
                                        "`garrison keys create --tenant t > t.key` saves it); it is never shown again.")
    owner = create.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tenant", help="tenant the key belongs to")
    owner.add_argument("--admin", action="store_true", help="an admin key (garrison.v1.Admin)")
    create.add_argument("--description", default="", help="free text, e.g. who holds it")
    create.add_argument("--json", action="store_true", help="print the key record and secret as JSON")
    create.set_defaults(run=_key_create)
    listing = sub.add_parser("list", help="list keys (ids and owners; never secrets)", parents=[connection])
    listing.add_argument("--tenant", default="", help="one tenant's keys")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_key_list)
    revoke = sub.add_parser("revoke", help="revoke a key at once", parents=[connection])
    revoke.add_argument("id", help="the key id (gk_...)")
    revoke.set_defaults(run=lambda a: _admin_call(a, "revoke_api_key", id=a.id) and 0)
    new_secret = sub.add_parser(
        "new-secret", help="make a new admin key secret offline, for a server's admin_key_file",
        description="Print a new random API key secret (gk_...) on stdout, once; no server is called. Put it in the "
                    "file a server's admin_key_file names (e.g. a Kubernetes Secret): at its next start the server "
                    "creates the admin key with that secret, if no key has it yet.")
    new_secret.add_argument("--out", type=Path, help="write it to this new file (mode 0600) instead of stdout")
    new_secret.set_defaults(run=_new_secret)
    return sub


def _quota(commands: Any, connection: argparse.ArgumentParser) -> None:
    parser = commands.add_parser("quota", help="show or set a tenant's limits")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    set_ = sub.add_parser("set", help="change the limits given; keep the others", parents=[connection])
    set_.add_argument("tenant")
    _add_quota_flags(set_)
    set_.add_argument("--json", action="store_true", help="print JSON")
    set_.set_defaults(run=_quota_set)
    show = sub.add_parser("show", help="a tenant's limits", parents=[connection])
    show.add_argument("tenant")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=lambda a: _print_quota(a, _admin_call(a, "get_quota", tenant=a.tenant)))


def _add_quota_flags(parser: argparse.ArgumentParser) -> None:
    for flag, field, kind, help_text in QUOTA_FLAGS:
        parser.add_argument(flag, dest=field, type=kind, help=help_text)


def _quota_message(args: argparse.Namespace, tenant: str) -> admin_pb2.Quota:
    quota = admin_pb2.Quota(tenant=tenant)
    for _, field, _, _ in QUOTA_FLAGS:
        if getattr(args, field) is not None:
            setattr(quota, field, getattr(args, field))
    return quota


def _admin_call(args: argparse.Namespace, method: str, **fields: Any) -> Any:
    with connect(args, ADMIN_KEY) as client:
        return getattr(client.admin, method)(**fields)


def _tenant_create(args: argparse.Namespace) -> int:
    models = [m for m in args.models.split(",") if m]
    tenant = _admin_call(args, "create_tenant", name=args.name, models=models, quota=_quota_message(args, args.name))
    return _print_tenants(args, [tenant])


def _tenant_list(args: argparse.Namespace) -> int:
    return _print_tenants(args, list(_admin_call(args, "list_tenants").tenants))


def _grant(args: argparse.Namespace) -> int:
    return _print_tenants(args, [_admin_call(args, args.rpc, tenant=args.tenant, model=args.model)])


def _print_tenants(args: argparse.Namespace, tenants: list[admin_pb2.Tenant]) -> int:
    if args.json:
        print_json(tenants)
        return 0
    print_table(("tenant", "models", "concurrent", "tokens/min", "max prompt", "max new", "weight", "created"),
                [(t.name, list(t.models), *_limits(t.quota), _when(t.created_at)) for t in tenants])
    return 0


def _limits(q: admin_pb2.Quota) -> list[Any]:
    return [getattr(q, field) or "unlimited" for field in ("max_concurrent_requests", "tokens_per_minute",
                                                           "max_prompt_tokens", "max_new_tokens")] + [q.priority_weight]


def _quota_set(args: argparse.Namespace) -> int:
    return _print_quota(args, _admin_call(args, "set_quota", quota=_quota_message(args, args.tenant)))


def _print_quota(args: argparse.Namespace, quota: admin_pb2.Quota) -> int:
    if args.json:
        print_json(quota)
    else:
        print_table(("tenant", "concurrent", "tokens/min", "max prompt", "max new", "weight"),
                    [(quota.tenant, *_limits(quota))])
    return 0


def _key_create(args: argparse.Namespace) -> int:
    created = _admin_call(args, "create_api_key", tenant=args.tenant or "", admin=args.admin,
                          description=args.description)
    if args.json:
        print_json(created)
        return 0
    owner = "admin key" if created.key.admin else f"key for tenant {created.key.tenant!r}"
    print(f"created {owner} {created.key.id}; its secret (on stdout) is shown only now", file=sys.stderr)
    print(created.secret)
    return 0


def _new_secret(args: argparse.Namespace) -> int:
    secret = keys.new_secret(keys.new_key_id())
    if args.out is not None:
        write_secret_file(args.out, (secret + "\n").encode("ascii"))
        print(f"wrote a new admin key secret (key id {keys.key_id_of(secret)}) to {args.out}, mode 0600",
              file=sys.stderr)
    else:
        print(f"a new admin key secret (key id {keys.key_id_of(secret)}), shown only now:", file=sys.stderr)
        print(secret)
    return 0


def _key_list(args: argparse.Namespace) -> int:
    keys = list(_admin_call(args, "list_api_keys", tenant=args.tenant).keys)
    if args.json:
        print_json(keys)
        return 0
    print_table(("id", "tenant", "admin", "description", "created", "revoked"),
                [(k.id, k.tenant or None, "yes" if k.admin else "", k.description, _when(k.created_at),
                  _when(k.revoked_at) if k.HasField("revoked_at") else None) for k in keys])
    return 0


def _usage(args: argparse.Namespace) -> int:
    rows = list(_admin_call(args, "get_usage", tenant=args.tenant, model=args.model, since=args.since,
                            until=args.until).rows)
    if args.json:
        print_json(rows)
        return 0
    headers = ("hour", "tenant", "model", "requests", "prompt tokens", "output tokens", "rejected")
    table = [(_when(r.hour), r.tenant, r.model, r.requests, r.prompt_tokens, r.output_tokens, r.rejected_requests)
             for r in rows]
    (print_csv if args.csv else print_table)(headers, table)
    return 0


def _audit(args: argparse.Namespace) -> int:
    events = list(_admin_call(args, "list_audit_events", since=args.since, limit=args.limit).events)
    if args.json:
        print_json(events)
        return 0
    print_table(("id", "time", "actor", "action", "target", "detail"),
                [(e.id, _when(e.time), e.actor, e.action, e.target, e.detail) for e in events])
    return 0


def _time(text: str) -> Timestamp:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time such as 2026-11-29T08:00Z") from None
    stamp = Timestamp()
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc))
    return stamp


def _when(stamp: Timestamp) -> str:
    return stamp.ToDatetime(tzinfo=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")

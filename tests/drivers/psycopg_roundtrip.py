"""psycopg 3: a parameterised round trip of common types, with text and binary
parameters and results, through signalbox and directly; prints JSON.
Env: SB_DSN, DIRECT_DSN."""
import datetime
import decimal
import json
import os
import sys
import uuid

import psycopg
from psycopg.types.json import Jsonb

PARAMS = [
    42,
    -7.25,
    decimal.Decimal("12345.6789"),
    "héllo wörld",
    True,
    datetime.datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=datetime.timezone.utc),
    datetime.date(1999, 12, 31),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    Jsonb({"a": [1, 2, {"b": None}]}),
    [1, 2, 3],
    b"\x00\x01\xff",
    None,
]
SQL_TEMPLATE = (
    "SELECT {p}::int4, {p}::float8, {p}::numeric, {p}::text, {p}::bool, {p}::timestamptz,"
    " {p}::date, {p}::uuid, {p}::jsonb, {p}::int[], {p}::bytea, {p}::text,"
    " inet_server_port(), pg_is_in_recovery()"
)


def run(dsn, binary):
    with psycopg.connect(dsn, autocommit=True) as conn:
        placeholder = "%b" if binary else "%t"
        sql = SQL_TEMPLATE.replace("{p}", placeholder)
        with conn.cursor(binary=binary) as cur:
            cur.execute(sql, PARAMS)
            row = cur.fetchone()
    return row


def main():
    out = {}
    for binary in (False, True):
        via = run(os.environ["SB_DSN"], binary)
        direct = run(os.environ["DIRECT_DSN"], binary)
        mode = "binary" if binary else "text"
        out[mode] = {
            "same": repr(via[:-2]) == repr(direct[:-2]),
            "replica": via[-1],
            "via": repr(via[:-2]),
        }
        if not out[mode]["same"]:
            out[mode]["direct"] = repr(direct[:-2])
    print(json.dumps(out))
    sys.exit(0 if all(v["same"] for v in out.values()) else 1)


main()

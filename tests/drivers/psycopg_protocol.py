"""psycopg 3 through signalbox, where protocol details decide whether an
application keeps working; prints one JSON object.
 - pipeline mode with an aborted statement, then more work on the connection;
 - a LISTENing connection that sits idle receives a NOTIFY;
 - a LATIN9 client inserts and reads 'é€'.
Env: SB_DSN. Table psycopg_latin9 (id serial, v text) exists on every node."""
import json
import os
import threading
import time

import psycopg

DSN = os.environ["SB_DSN"]
out = {}

with psycopg.connect(DSN, autocommit=True) as conn:
    try:
        with conn.pipeline():
            first = conn.execute("SELECT 'before'")
            conn.execute("SELECT * FROM no_such_table_in_a_pipeline")
            conn.execute("SELECT 'skipped'")
        out["pipeline_error"] = None
    except psycopg.errors.UndefinedTable as e:
        out["pipeline_error"] = e.sqlstate
    out["before"] = first.fetchone()[0]
    with conn.pipeline():
        cursors = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(5)]
    out["after_pipeline"] = [c.fetchone()[0] for c in cursors]
    out["after_plain"] = conn.execute("SELECT 'plain'").fetchone()[0]

with psycopg.connect(DSN, autocommit=True) as listener:
    listener.execute("LISTEN psycopg_idle")

    def notify():
        time.sleep(0.5)
        with psycopg.connect(DSN, autocommit=True) as n:
            n.execute("NOTIFY psycopg_idle, 'while idle'")

    t = threading.Thread(target=notify)
    started = time.monotonic()
    t.start()
    got = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
    t.join()
    out["notified"] = got
    out["notify_seconds"] = round(time.monotonic() - started, 2)

with psycopg.connect(DSN, autocommit=True, client_encoding="latin9") as conn:
    out["client_encoding"] = conn.info.parameter_status("client_encoding")
    row = conn.execute(
        "INSERT INTO psycopg_latin9 (v) VALUES (%s) RETURNING id, v", ("é€",)
    ).fetchone()
    out["inserted"] = row[1]
    read = None
    deadline = time.monotonic() + 10
    while read is None and time.monotonic() < deadline:
        r = conn.execute(
            "SELECT v FROM psycopg_latin9 WHERE id = %s AND v = 'é€'", (row[0],)
        ).fetchone()
        read = r[0] if r else None
        if read is None:
            time.sleep(0.05)
    out["read"] = read

print(json.dumps(out))

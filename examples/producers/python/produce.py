"""A product service in Python writes its own row and its widget in one transaction.

    pip install "psycopg[binary]"
    SOURCE_DATABASE_URL=postgresql://... python produce.py deal-42 "Espresso machine" 8999

The widget is queued with `widget_enqueue` (installed by `widget-runtime migrate product`),
whose version comes from `widget_next_version`, a per-key counter bumped in the same
transaction: the outbox-worker relays it the moment the transaction commits, and nothing is
queued if it rolls back. A rule the widget breaks is a typed SQL error (SQLSTATE class WK)
before commit, e.g. WK001 for a bad key or WK005 for content over 64 KiB.
"""

import json
import os
import sys

import psycopg
from psycopg.types.json import Jsonb


def publish_deal(conn: psycopg.Connection, deal_id: str, title: str, price_cents: int) -> int:
    with conn.transaction():
        conn.execute(
            """CREATE TABLE IF NOT EXISTS deals (
                   id text PRIMARY KEY, title text NOT NULL, price_cents integer NOT NULL)"""
        )
        conn.execute(
            """INSERT INTO deals (id, title, price_cents) VALUES (%s, %s, %s)
               ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title,
                                              price_cents = EXCLUDED.price_cents""",
            (deal_id, title, price_cents),
        )
        key = "deals.top-picks"
        (version,) = conn.execute("SELECT widget_next_version(%s)", (key,)).fetchone()
        content = {"title": title, "price": {"cents": price_cents, "currency": "EUR"}, "deal": deal_id}
        conn.execute(
            "SELECT widget_enqueue(%s, %s, %s, %s)", (key, "deal-card", version, Jsonb(content))
        )
        return version


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    deal_id, title, price = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with psycopg.connect(os.environ["SOURCE_DATABASE_URL"]) as conn:
        try:
            version = publish_deal(conn, deal_id, title, price)
        except psycopg.Error as e:
            # e.sqlstate is e.g. "WK001": the widget broke a rule; nothing was written.
            print(f"not published ({e.sqlstate}): {e}", file=sys.stderr)
            return 1
    print(json.dumps({"key": "deals.top-picks", "version": version}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

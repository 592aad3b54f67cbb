"""The demo data: a ``transactions`` table generated inside PostgreSQL, made once and reused."""

from __future__ import annotations

import time

import asyncpg

SEGMENTS = ("enterprise", "mid_market", "smb", "startup", "public_sector")

_CREATE = """
CREATE TABLE IF NOT EXISTS transactions (
    id         bigint PRIMARY KEY,
    segment    text NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS demo_seed (rows bigint NOT NULL, seeded_at timestamptz NOT NULL);
"""

# Segments are skewed like real customer bases; amounts follow the segment's size; dates
# spread over 2023-2025. A fixed setseed makes every demo database identical.
_FILL = """
SELECT setseed(0.42);
INSERT INTO transactions (id, segment, amount, created_at)
SELECT g,
       (ARRAY['enterprise','mid_market','mid_market','smb','smb','smb','startup','startup',
              'public_sector','smb'])[1 + (g::bigint * 7919) % 10],
       round((CASE (g::bigint * 7919) % 10 WHEN 0 THEN 5000 WHEN 1 THEN 900 WHEN 2 THEN 900
              WHEN 8 THEN 2500 ELSE 150 END * (0.2 + random() * 1.6))::numeric, 2),
       timestamptz '2023-01-01 00:00:00+00' + (random() * interval '1095 days')
FROM generate_series(1, $ROWS) AS g;
CREATE INDEX IF NOT EXISTS transactions_segment_created ON transactions (segment, created_at);
ANALYZE transactions;
"""


async def ensure_transactions(conn: asyncpg.Connection, rows: int) -> tuple[int, float]:
    """Create and fill the demo table unless it already holds ``rows`` rows.

    Returns (rows, seconds spent filling; 0 when reused).
    """
    await conn.execute(_CREATE)
    seeded = await conn.fetchval("SELECT max(rows) FROM demo_seed")
    if seeded == rows:
        return rows, 0.0
    started = time.perf_counter()
    async with conn.transaction():
        await conn.execute("TRUNCATE transactions; DELETE FROM demo_seed;")
        await conn.execute(_FILL.replace("$ROWS", str(int(rows))))
        await conn.execute("INSERT INTO demo_seed VALUES ($1, now())", rows)
    return rows, time.perf_counter() - started

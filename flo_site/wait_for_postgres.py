"""Exit 0 if the PostgreSQL server in argv[1] accepts a connection within a few seconds, 1 otherwise.

With --create, a missing database is created first (through the server's
`postgres` database), so `make serve` works on a fresh server.
"""

import sys
import time

import psycopg
from psycopg import sql

ATTEMPTS = 5


def main() -> int:
    url = sys.argv[1]
    if "--create" in sys.argv[2:]:
        create_database_if_missing(url)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with psycopg.connect(url, connect_timeout=3) as connection:
                connection.execute("SELECT 1")
            return 0
        except psycopg.OperationalError as error:
            print(f"PostgreSQL not reachable (attempt {attempt}/{ATTEMPTS}): {error}".strip(), file=sys.stderr)
            time.sleep(1)
    return 1


def create_database_if_missing(url: str) -> None:
    base, name = url.rsplit("/", 1)
    try:
        with psycopg.connect(f"{base}/postgres", connect_timeout=3, autocommit=True) as connection:
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                print(f"Created database {name}.", file=sys.stderr)
    except psycopg.OperationalError as error:
        print(f"Cannot check or create database {name}: {error}".strip(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

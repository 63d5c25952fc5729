"""Exit 0 if the PostgreSQL server in argv[1] accepts a connection within a few seconds, 1 otherwise."""

import sys
import time

import psycopg

ATTEMPTS = 5


def main() -> int:
    url = sys.argv[1]
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with psycopg.connect(url, connect_timeout=3) as connection:
                connection.execute("SELECT 1")
            return 0
        except psycopg.OperationalError as error:
            print(f"PostgreSQL not reachable (attempt {attempt}/{ATTEMPTS}): {error}".strip(), file=sys.stderr)
            time.sleep(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())

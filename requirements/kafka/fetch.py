"""Fetch Apache Kafka's broker jars from Maven Central into the local cache, checked against the lock.

    python requirements/kafka/fetch.py            # fetch (once) and check; the install step runs this
    python requirements/kafka/fetch.py --update   # re-resolve pom.xml and rewrite jars.sha256

The jars land in ``rnnd.apache_kafka.libs_dir()`` (``~/.cache/rnnd/apache-kafka-<version>``,
or ``$RNND_KAFKA_LIBS``); Maven keeps its own copy in ``~/.m2``, so a fresh clone on a machine
that fetched once before copies them again without the network. A jar whose digest differs
from ``jars.sha256``, or a jar missing from it, fails the fetch: what runs is what was locked.
Needs Java 17+ and Maven on PATH only for the fetch itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rnnd import apache_kafka
from rnnd.daemon.errors import BrokerSetupError

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="resolve pom.xml again and rewrite jars.sha256")
    args = parser.parse_args()
    try:
        libs = apache_kafka.fetch(HERE / "pom.xml", HERE / "jars.sha256", update=args.update)
    except BrokerSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"Apache Kafka {apache_kafka.VERSION}: {len(list(libs.glob('*.jar')))} jars in {libs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

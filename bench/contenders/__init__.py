"""The contenders: each module is a program (``python -m bench.contenders.NAME``) that does the
daemon's job — or, for the ceilings, only part of it — over Kafka. See ``bench.harness`` for
how they are started and measured, and ``bench.common`` for what they share."""

"""The output partition of a key is the one Kafka's default partitioner gives it (murmur2 of the key).

The sink and ``rnnd predict`` place keys with ``kafka.sink.default_partitions``, a vectorised
murmur2 of rnnd's own; the reference here is aiokafka's partitioner, key by key.
"""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from rnnd.daemon.kafka.sink import default_partitions


def test_the_vectorised_partitioner_agrees_with_aiokafkas_murmur2_for_every_key_length() -> None:
    """``default_partitions`` (numpy, all keys of a length at once) against aiokafka's own partitioner,
    key by key: lengths 0-70 (every tail of 0-3 bytes), bytes of every value, long keys, and one
    to 1,000 partitions."""
    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(71))) for _ in range(3000)]
    keys += [b"", b"\x00", b"\xff" * 300, *(b"dev-%07d" % i for i in range(500))]
    for n in (1, 2, 3, 4, 7, 64, 1000):
        expected = [DefaultPartitioner()(k, list(range(n)), list(range(n))) for k in keys]
        assert default_partitions(keys, n) == expected, n

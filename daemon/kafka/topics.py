"""The daemon's topics at start: the input must exist, the outputs are made to match it.

The input's partition count is a decision (it bounds how many replicas can share the work),
so the daemon never makes the input topic; the outputs get the input's count, and the state
changelog must have exactly that count, since changelog partition p holds the streams of
input partition p.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from ..errors import MissingTopicError, TopicLayoutError
from .clients import admin, client_settings
from .quirks import topic_partitions

if TYPE_CHECKING:
    from ..config import ServeConfig

__all__ = ["MAX_DEFAULT_REPLICATION", "MissingTopic", "MissingTopicError", "default_replication", "ensure_topics"]

log = logging.getLogger("rnnd.kafka")

#: The daemon's name for :class:`~rnnd.daemon.errors.MissingTopicError` (``except kafka.MissingTopic``).
MissingTopic = MissingTopicError

#: Replicas of a topic rnnd creates: Kafka's usual production choice, fewer on a smaller cluster.
#: (aiokafka's NewTopic refuses Kafka's "broker default" of -1, so the count is chosen here.)
MAX_DEFAULT_REPLICATION = 3


async def ensure_topics(cfg: ServeConfig, input_topic: str, outputs: list[str],
                        configs: dict[str, dict[str, str]] | None = None,
                        copartitioned: tuple[str, ...] = ()) -> int:
    """Create missing output topics with the input's partition count; return that count.

    Topics in ``copartitioned`` (the state changelog) must have exactly the input's partition
    count. Raises :class:`MissingTopicError` without the input topic (the daemon waits for it: a
    deployment job may create it) and :class:`TopicLayoutError` for a changelog of another count.
    """
    client = admin(client_settings(cfg), f"{cfg.client_id}-admin")
    await client.start()
    try:
        existing = await topic_partitions(client)
        if input_topic not in existing:
            raise MissingTopicError(f"input topic {input_topic!r} does not exist on the brokers at "
                               f"{cfg.bootstrap_servers}: create it (rnnd topics create, with these settings and "
                               "the partition count you want: partitions bound how many replicas can share the "
                               "work) or check the name")
        parts = len(existing[input_topic])
        missing = [t for t in outputs if t not in existing]
        if missing and cfg.create_topics:
            replication = await default_replication(client)
            new = [NewTopic(t, num_partitions=parts, replication_factor=replication,
                            topic_configs=(configs or {}).get(t, {})) for t in missing]
            try:
                await client.create_topics(new)
                log.info("created topics %s with %d partitions", ", ".join(missing), parts)
            except TopicAlreadyExistsError:
                pass
        for topic in copartitioned:
            if topic in existing and len(existing[topic]) != parts:
                raise TopicLayoutError(
                    f"state changelog {topic!r} has {len(existing[topic])} partitions but input topic "
                    f"{input_topic!r} has {parts}: they must be co-partitioned (a changelog partition holds the "
                    "streams of the same input partition). Recreate the changelog with the input's partition count")
        return parts
    finally:
        await client.close()


async def default_replication(client: Any) -> int:
    """Replication factor for new topics: the number of brokers, at most MAX_DEFAULT_REPLICATION.

    ``client``: a started ``AIOKafkaAdminClient``.
    """
    cluster = await client.describe_cluster()
    return max(1, min(MAX_DEFAULT_REPLICATION, len(cluster.get("brokers") or ())))

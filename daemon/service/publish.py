"""Where the daemon's records go: predictions to the output topic, dead letters to theirs.

Both only hand records to the sink; they count as delivered when a checkpoint's flush has
them acknowledged (see ``checkpoint``).
"""

from __future__ import annotations

import time

import numpy as np

from ..config import ServeConfig
from ..metrics import Metrics
from ..pipeline import Output, Pipeline
from .clients import Clients


class Publisher:
    def __init__(self, cfg: ServeConfig, pipeline: Pipeline, metrics: Metrics, clients: Clients) -> None:
        self.output_topic = cfg.output_topic
        self.dlq_topic = cfg.dlq_topic
        self.pipeline = pipeline
        self.clients = clients
        self.latency = metrics.latency
        self.predictions = metrics.predictions
        self.copy_headers = bool(cfg.copied_headers)

    async def publish(self, outputs: list[Output]) -> None:
        """One model call's outputs (a batch: one send, one latency observation for all)."""
        if not outputs:
            return
        sink = self.clients.sink
        assert sink is not None
        if self.copy_headers and any(o[4] for o in outputs):
            await sink.send_many(self.output_topic, outputs, headers=[o[4] or [] for o in outputs])
        else:
            await sink.send_many(self.output_topic, outputs)
        ts = np.fromiter((o[2] for o in outputs), np.float64, len(outputs))
        self.latency.observe_many(np.maximum(time.time() - ts / 1000, 0.0))
        self.predictions.inc(len(outputs))

    async def send_side_outputs(self) -> None:
        """Dead letters, which the fetch loop produces (decoding happens there), not the infer loop.

        A checkpoint sends them too, right after its snapshot of the commit points: every dead
        letter of a record below a commit point is then handed over before that commit.
        """
        dead = self.pipeline.take_dead_letters()
        sink = self.clients.sink
        if not dead or sink is None:
            return
        await sink.send_many(self.dlq_topic, [(d.key, d.encode()) for d in dead],
                             headers=[[("rnnd.reason", d.reason.encode()), *(d.headers or ())] for d in dead],
                             sources=[d.partition for d in dead])

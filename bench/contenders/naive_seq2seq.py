"""Naive seq2seq consumer: each message answered on its own, as a user's first version would.

One encoder call per message, then one decoder-step call per output token, greedy, until the end
token or the bundle's max_output_len: plain ``session.run`` on the bundle's two graphs (the
decoder step is the bundle's graph, the encoder its embedded second graph). Same session options
and output documents as the daemon; what it lacks is batching across messages.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bench import common


def setup(args: argparse.Namespace) -> tuple[common.Handler, None]:
    info = common.ModelInfo.load(args.model)
    spec = info.spec
    s2s = spec.seq2seq
    if s2s is None:
        raise SystemExit(f"{args.model} is not a seq2seq bundle")
    meta = {p.key: p.value for p in onnx.load(str(args.model), load_external_data=False).metadata_props}
    decoder = ort.InferenceSession(str(args.model), sess_options=common.session_options(),
                                   providers=["CPUExecutionProvider"])
    encoder = ort.InferenceSession(base64.b64decode(meta[s2s.encoder_graph]), sess_options=common.session_options(),
                                   providers=["CPUExecutionProvider"])
    enc_out = [s2s.memory_name] + [f"{s.name}_init" for s in s2s.states]
    dec_out = [spec.y_name] + [s.output_name for s in s2s.states]
    vocab = spec.output.vocab
    steps: dict[bytes, int] = {}

    def answer(source: np.ndarray) -> dict[str, Any]:
        memory, *state = encoder.run(enc_out, {s2s.source_name: source[None]})
        mask = np.ones(memory.shape[:2], dtype=bool)
        prev, ids, logp, stop = s2s.bos_id, [], 0.0, "max_output_len"
        while len(ids) < s2s.max_output_len:
            feed = {spec.x_name: np.array([prev], dtype=np.int64), s2s.memory_name: memory, s2s.mask_name: mask}
            feed.update({s.input_name: v for s, v in zip(s2s.states, state, strict=True)})
            logits, *state = decoder.run(dec_out, feed)
            z = logits[0].astype(np.float64) - logits[0].max()
            prev = int(z.argmax())
            logp += float(z[prev] - np.log(np.exp(z).sum()))
            if prev == s2s.eos_id:
                stop = "end_token"
                break
            ids.append(prev)
        return {"output": s2s.separator.join(vocab[i] for i in ids), "output_ids": ids, "logp": logp, "stop": stop}

    async def handle(ctx: common.Ctx, records: list[tuple[int, Any]]) -> None:
        topic = ctx.input_topic
        for partition, r in records:
            pred = answer(info.model_input(common.decode(r.value, ctx.loads, info)))
            step = steps.get(r.key, 0)
            steps[r.key] = step + 1
            await ctx.emit(r.key, common.output_doc(topic, r.key, partition, r.offset, r.timestamp, 0, step, pred,
                                                    info, common.now_ms()))

    return handle, None


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(argv, "naive-seq2seq", __doc__ or "", setup)


if __name__ == "__main__":
    sys.exit(main())

"""Encoder–decoder bundles: export, greedy and beam answers against PyTorch, cellular batching,
the daemon's seq2seq pipeline and verify.

The PyTorch references here are written independently of rnnd's decoding (daemon/seq2seq.py):
one message at a time, unpadded, hypotheses as Python lists, in torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from test_schemas import errors as schema_errors

from rnnd.daemon import verify
from rnnd.daemon.bundle import InputSpec, OutputSpec, TokenizerSpec
from rnnd.daemon.codec import TOO_MANY_STEPS
from rnnd.daemon.config import ConfigError, ServeConfig
from rnnd.daemon.pipeline import Seq2SeqPipeline, pipeline_for
from rnnd.daemon.runtime import BundleModel
from rnnd.daemon.seq2seq import Cells, answer_one
from rnnd.export import zoo
from rnnd.export.errors import ExportError, ParityError
from rnnd.export.exporter import ExportOptions, export_bundle

TOPIC = "s2s-in"


class Sent:
    def __init__(self, key: bytes, value: bytes, offset: int) -> None:
        self.key, self.value, self.offset, self.timestamp = key, value, offset, 1_000 + offset


@pytest.fixture(scope="module")
def reverse(recipe_bundle) -> tuple[BundleModel, torch.nn.Module]:
    """The reverse recipe's bundle, and its PyTorch model rebuilt from the recipe's checkpoint."""
    bundle = recipe_bundle("reverse")
    ckpt = torch.load(Path(bundle).with_suffix(".pt"), weights_only=False)
    model = zoo.build(**ckpt["rnnd"]["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return BundleModel(bundle), model.eval()


def torch_beam(model: Any, source: np.ndarray, k: int, max_len: int,
               alpha: float = 1.0) -> tuple[list[int], float, str]:
    """Beam search as daemon/seq2seq.py states it, for one source, in PyTorch: 2k best candidates in
    order, an end token among the first k ends its hypothesis, k ended (or max_len) stops; best score wins."""
    with torch.no_grad():
        memory, *state = model.encode(torch.from_numpy(source)[None])
        mask = torch.ones(memory.shape[:2], dtype=torch.bool)
        beams: list[tuple[float, list[int], list[torch.Tensor]]] = [(0.0, [], state)]
        ended: list[tuple[float, list[int], float, str]] = []
        for step in range(max_len):
            cands = []
            for lp, toks, st in beams:
                prev = torch.tensor([toks[-1] if toks else model.bos_id])
                logits, *new = model.decode_step(prev, memory, mask, *st)
                logp = torch.log_softmax(logits[0].double(), dim=-1)
                cands += [(lp + float(logp[t]), toks, t, new) for t in range(len(logp))]
            cands.sort(key=lambda c: -c[0])  # stable: ties keep (hypothesis, token) order
            nxt: list[tuple[float, list[int], list[torch.Tensor]]] = []
            for rank, (s, toks, t, new) in enumerate(cands[:2 * k]):
                if t == model.eos_id:
                    if rank < k:
                        ended.append((s / (len(toks) + 1) ** alpha, toks, s, "end_token"))
                    continue
                nxt.append((s, [*toks, t], new))
                if len(nxt) == k:
                    break
            if len(ended) >= k or step + 1 >= max_len or not nxt:
                if len(ended) < k:
                    ended += [(s / (step + 1) ** alpha, toks, s, "max_output_len") for s, toks, _ in nxt]
                break
            beams = nxt
    best = max(range(len(ended)), key=lambda j: (ended[j][0], -j))
    return ended[best][1], ended[best][2], ended[best][3]


def torch_greedy(model: Any, source: np.ndarray, max_len: int) -> tuple[list[int], float, str]:
    with torch.no_grad():
        memory, *state = model.encode(torch.from_numpy(source)[None])
        mask = torch.ones(memory.shape[:2], dtype=torch.bool)
        prev, ids, total = torch.tensor([model.bos_id]), [], 0.0
        while True:
            logits, *state = model.decode_step(prev, memory, mask, *state)
            tok = int(logits[0].argmax())
            total += float(torch.log_softmax(logits[0].double(), dim=-1)[tok])
            if tok == model.eos_id:
                return ids, total, "end_token"
            ids.append(tok)
            if len(ids) >= max_len:
                return ids, total, "max_output_len"
            prev = torch.tensor([tok])


def words(rng: np.random.Generator, n: int, lengths: tuple[int, int]) -> list[str]:
    return ["".join(rng.choice(list("abcdefghijkl"), size=int(rng.integers(lengths[0], lengths[1] + 1))))
            for _ in range(n)]


def serve(model: BundleModel, texts: list[str], keys: int, **cfg: Any) -> tuple[list[dict], Seq2SeqPipeline]:
    """All messages accepted at once (so ``keys`` of them decode concurrently), rounds run until idle."""
    pipeline = pipeline_for(model, ServeConfig(model="m", input_topic=TOPIC, output_topic="out", **cfg), TOPIC)
    assert isinstance(pipeline, Seq2SeqPipeline)
    sent = [Sent(f"k{i % keys}".encode(), json.dumps({"text": t}).encode(), i) for i, t in enumerate(texts)]
    assert pipeline.accept_many(0, sent) == len(sent)
    docs, widest = [], 0
    while pipeline.busy():
        calls = pipeline.plan()
        widest = max(widest, len(pipeline.cells) + sum(len(c.arrivals) for c in calls))  # type: ignore[attr-defined]
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(calls))]
    pipeline.widest = widest  # type: ignore[attr-defined]
    return docs, pipeline


@pytest.mark.parametrize("beam", [1, 3])
def test_batched_answers_equal_pytorch_and_one_at_a_time(reverse, beam: int) -> None:
    """150 messages, 100 decoded concurrently and the other 50 joining as their stream's first answer
    leaves (sources of 1-14 letters padded together), answer exactly as PyTorch answers each alone,
    and as the bundle answers each alone."""
    bundle, model = reverse
    texts = words(np.random.default_rng(beam), 150, (1, 14))
    docs, pipeline = serve(bundle, texts, keys=100, beam_size=beam)
    assert pipeline.widest >= 100  # type: ignore[attr-defined]
    assert len(docs) == len(texts) and pipeline.offsets.commit_points() == {0: len(texts)}
    tok = pipeline.decoder.tokenizer
    assert tok is not None
    vocab = bundle.spec.output.vocab
    exact = trained = 0
    for d in docs:
        src = tok.encode(texts[d["offset"]])
        want = (torch_greedy(model, src, 24) if beam == 1 else torch_beam(model, src, beam, 24))
        pred = d["prediction"]
        assert (pred["output_ids"], pred["stop"]) == (want[0], want[2]), texts[d["offset"]]
        assert abs(pred["logp"] - want[1]) <= 1e-4 * max(1, len(want[0]))
        assert pred["output"] == "".join(vocab[i] for i in want[0])
        alone = answer_one(bundle, src, beam_size=beam)
        assert alone.ids == pred["output_ids"]
        if 3 <= len(texts[d["offset"]]) <= 10:  # the recipe's lengths (1-2 and 11-14 are not trained)
            exact += pred["output"] == texts[d["offset"]][::-1]
            trained += 1
    assert exact >= 0.9 * trained, (exact, trained)


@pytest.mark.parametrize("beam", [1, 2])
def test_rows_that_join_leave_and_move_keep_their_answers(reverse, beam: int) -> None:
    """Cells straight: long sources first, short ones joining every round. Leaving rows are filled
    by the last ones, the memory buffer grows for arrivals and narrows once the long sources are
    answered; every answer stays the bundle's answer to that source alone."""
    bundle, _ = reverse
    rng = np.random.default_rng(11)
    long = [rng.integers(2, 14, size=20) for _ in range(6)]
    short = [rng.integers(2, 14, size=int(rng.integers(2, 5))) for _ in range(400)]
    cells = Cells(bundle, beam_size=beam)
    cells.add([(("long", i), src) for i, src in enumerate(long)])
    answers: dict[tuple[str, int], list[int]] = {}
    widths = []
    for r in range(200):
        cells.add([(("short", i), short[i]) for i in range(10 * r, min(len(short), 10 * r + 10))])
        widths.append(cells.memory.shape[1])
        assert cells.memory.shape[0] == cells.rows == beam * len(cells)
        answers.update((tag, a.ids) for tag, a in cells.step())  # type: ignore[misc]
        if not len(cells) and 10 * r >= len(short):
            break
    assert len(answers) == len(long) + len(short)
    assert widths[0] == 20 and min(widths) <= 4  # grown for the long sources, narrowed after them
    for (kind, i), ids in answers.items():
        assert ids == answer_one(bundle, (long if kind == "long" else short)[i], beam_size=beam).ids, (kind, i)


def test_max_output_len_cuts_answers_and_a_stream_is_answered_in_order(reverse) -> None:
    bundle, model = reverse
    texts = words(np.random.default_rng(7), 40, (6, 9))
    docs, _ = serve(bundle, texts, keys=4, beam_size=2, max_output_len=4, length_penalty=0.5)
    by_key: dict[str, list[dict]] = {}
    for d in docs:
        by_key.setdefault(d["key"], []).append(d)
    for key, ds in by_key.items():
        assert [d["offset"] for d in ds] == sorted(d["offset"] for d in ds), key  # input order within a stream
        assert [d["step"] for d in ds] == list(range(len(ds)))
    src_tok = pipeline_for(bundle, ServeConfig(model="m", input_topic=TOPIC, output_topic="o"), TOPIC).decoder.tokenizer
    assert src_tok is not None
    for d in docs:
        want = torch_beam(model, src_tok.encode(texts[d["offset"]]), 2, 4, alpha=0.5)
        assert (d["prediction"]["output_ids"], d["prediction"]["stop"]) == (want[0], want[2])
        assert d["prediction"]["stop"] == "max_output_len" and len(want[0]) == 4


def test_settings_a_seq2seq_bundle_cannot_honour_are_refused(reverse, recipe_bundle) -> None:
    bundle, _ = reverse

    def cfg(**kw: Any) -> ServeConfig:
        return ServeConfig(model="m", input_topic=TOPIC, output_topic="o", **kw)

    with pytest.raises(ConfigError, match="max_output_len must be at most 24"):
        pipeline_for(bundle, cfg(max_output_len=25), TOPIC)
    with pytest.raises(ConfigError, match="emit"):
        pipeline_for(bundle, cfg(emit="end"), TOPIC)
    with pytest.raises(ConfigError, match="generate_tokens"):
        pipeline_for(bundle, cfg(generate_tokens=3), TOPIC)
    with pytest.raises(ConfigError, match="beam_size is for seq2seq bundles"):
        pipeline_for(BundleModel(recipe_bundle("charlm")), cfg(beam_size=4), TOPIC)
    with pytest.raises(ConfigError, match="length_penalty"):
        cfg(length_penalty=0.5).validate()


def test_bad_messages_are_dead_letters_and_verify_recomputes_answers(reverse) -> None:
    bundle, _ = reverse
    cfg = ServeConfig(model="m", input_topic=TOPIC, output_topic="o", beam_size=2)
    pipeline = pipeline_for(bundle, cfg, TOPIC)
    values = [{"text": "abc"}, {"text": "a" * 257}, {"x": [1.0]}, {"text": "lkj"}, {"control": "end"},
              {"text": "defg"}]
    sent = [Sent(b"k", json.dumps(v).encode(), i) for i, v in enumerate(values)]
    assert pipeline.accept_many(0, sent) == len(sent)
    outputs: dict[str, list[bytes]] = {}
    while pipeline.busy():
        for o in pipeline.finish(pipeline.execute(pipeline.plan())):
            outputs.setdefault(orjson.loads(o.value)["id"], []).append(o.value)
    dead = pipeline.take_dead_letters()
    assert [(d.offset, d.reason) for d in dead] == [(1, TOO_MANY_STEPS), (2, "wrong_input_kind")]
    assert "max_source_len" in dead[0].message
    assert sorted(outputs) == [f"{TOPIC}/0/{i}/0" for i in (0, 3, 5)]
    for docs in outputs.values():
        assert schema_errors("output", orjson.loads(docs[0])) == []
    assert schema_errors("dead-letter", orjson.loads(dead[0].encode())) == []
    assert pipeline.offsets.commit_points() == {0: 6}
    inputs = {0: [(s.key, s.value, s.offset, s.timestamp) for s in sent]}
    report = verify.compare(bundle, cfg, inputs, outputs, 1e-4)
    assert report.ok and report.expected == report.received == 3, report.text()
    # an answer changed by one token is wrong; one with another search's answer too
    doc = orjson.loads(outputs[f"{TOPIC}/0/3/0"][0])
    doc["prediction"]["output_ids"] = doc["prediction"]["output_ids"][:-1]
    tampered = {**outputs, f"{TOPIC}/0/3/0": [orjson.dumps(doc)]}
    assert [pid for pid, _ in verify.compare(bundle, cfg, inputs, tampered, 1e-4).wrong] == [f"{TOPIC}/0/3/0"]


class IgnoresMask(zoo.Translator):
    """Attends over the padding too: padded answers differ from unpadded ones."""

    def decode_step(self, token, memory, memory_mask, h, context):  # type: ignore[override]
        return super().decode_step(token, memory, torch.ones_like(memory_mask), h, context)


def _options(**kw: Any) -> ExportOptions:
    letters = tuple("abcdefgh")
    src = TokenizerSpec("char", ("<pad>", "<unk>", *letters), unk_id=1, pad_id=0)
    return ExportOptions(name="t", input=InputSpec("tokens", tokenizer=src),
                         output=OutputSpec("language_model", vocab=("<bos>", "<eos>", *letters)), mode="seq2seq",
                         max_output_len=12, **kw)


def test_export_proves_padding_is_masked_and_refuses_what_is_not_the_protocol(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ok = export_bundle(zoo.Translator(src_vocab=10, tgt_vocab=10, hidden=16, embed_dim=8).eval(), _options(),
                       tmp_path / "ok.onnx")
    assert ok.spec.parity is not None and ok.spec.parity.max_abs_err <= 1e-4
    assert BundleModel(ok.path).self_check() <= 1e-4
    with pytest.raises(ParityError, match="memory_mask"):
        export_bundle(IgnoresMask(src_vocab=10, tgt_vocab=10, hidden=16, embed_dim=8).eval(), _options(),
                      tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    with pytest.raises(ExportError, match="SeqModel has no encode"):
        export_bundle(zoo.SeqModel(vocab_size=10, out_size=10).eval(), _options(), tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="12 logits but the output vocabulary has 10"):
        export_bundle(zoo.Translator(src_vocab=10, tgt_vocab=12).eval(), _options(), tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="--random-init is not for --mode seq2seq"):
        from rnnd.daemon.bundle import RandomInit

        export_bundle(zoo.Translator(src_vocab=10, tgt_vocab=10).eval(),
                      _options(random_init=RandomInit("normal", (0.0, 1.0), 0)), tmp_path / "x.onnx")


def test_a_numeric_source_is_answered_as_pytorch_answers_it(tmp_path: Path) -> None:
    """A source of numbers (3 features per step, normalised as the bundle says) answered with tokens:
    the daemon's answers to {"x": [[...], ...]} messages equal PyTorch's greedy answers to the
    normalised sources."""
    torch.manual_seed(2)
    model = zoo.Translator(n_features=3, tgt_vocab=7, hidden=16, embed_dim=8).eval()
    inp = InputSpec("numeric", features=("a", "b", "c"), mean=(1.0, 0.0, -2.0), std=(2.0, 1.0, 0.5))
    out = OutputSpec("language_model", vocab=("<s>", "</s>", *"wxyzv"))
    bundle = BundleModel(export_bundle(model, ExportOptions(name="num", input=inp, output=out, mode="seq2seq",
                                                            max_output_len=10), tmp_path / "num.onnx").path)
    assert bundle.spec.seq2seq is not None and bundle.spec.seq2seq.separator == " "  # no char tokenizer: words
    rng = np.random.default_rng(3)
    raw = [rng.normal([1.0, 0.0, -2.0], [2.0, 1.0, 0.5], size=(int(rng.integers(1, 9)), 3)).round(3)
           for _ in range(30)]
    pipeline = pipeline_for(bundle, ServeConfig(model="m", input_topic=TOPIC, output_topic="o"), TOPIC)
    sent = [Sent(f"k{i}".encode(), json.dumps({"x": r.tolist()}).encode(), i) for i, r in enumerate(raw)]
    assert pipeline.accept_many(0, sent) == len(sent)
    docs = []
    while pipeline.busy():
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(pipeline.plan()))]
    assert len(docs) == len(raw)
    for d in docs:
        src = ((raw[d["offset"]] - np.array(inp.mean)) / np.array(inp.std)).astype(np.float32)
        ids, logp, stop = torch_greedy(model, src, 10)
        assert (d["prediction"]["output_ids"], d["prediction"]["stop"]) == (ids, stop)
        assert abs(d["prediction"]["logp"] - logp) <= 1e-4 * max(1, len(ids))
        assert d["prediction"]["output"] == " ".join(out.vocab[i] for i in ids)


def test_a_revoked_partition_leaves_the_cells_and_the_others_finish(reverse) -> None:
    """Messages of a revoked partition in mid-answer are dropped with it (uncommitted: the next owner
    answers them); the other partition's answers are unaffected and every record is accounted for."""
    bundle, _ = reverse
    pipeline = pipeline_for(bundle, ServeConfig(model="m", input_topic=TOPIC, output_topic="o"), TOPIC)
    texts = words(np.random.default_rng(9), 40, (6, 10))
    for p in (0, 1):
        assert pipeline.accept_many(p, [Sent(f"p{p}k{i}".encode(), json.dumps({"text": t}).encode(), i)
                                        for i, t in enumerate(texts)]) == len(texts)
    docs = [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(pipeline.plan()))]
    assert docs == [] and pipeline.answering == 80  # one token each so far: nobody answered yet
    pipeline.revoke(1)
    assert pipeline.answering == 40
    while pipeline.busy():
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(pipeline.plan()))]
    assert sorted((d["partition"], d["offset"]) for d in docs) == [(0, i) for i in range(40)]
    assert pipeline.scheduler.inflight == 0 and pipeline.offsets.commit_points() == {0: 40}
    tok = pipeline.decoder.tokenizer
    assert tok is not None
    for d in docs:
        assert d["prediction"]["output_ids"] == answer_one(bundle, tok.encode(texts[d["offset"]])).ids


def test_a_hot_swap_waits_for_the_answers_in_flight(reverse, recipe_bundle) -> None:
    """A swap asked for while answers are in flight admits no message until they are out, then swaps:
    every answer is one bundle's, and equals that source answered alone."""
    bundle, _ = reverse
    texts = words(np.random.default_rng(5), 80, (6, 12))
    pipeline = pipeline_for(bundle, ServeConfig(model="m", input_topic=TOPIC, output_topic="out"), TOPIC)
    assert isinstance(pipeline, Seq2SeqPipeline)
    sent = [Sent(f"k{i % 40}".encode(), json.dumps({"text": t}).encode(), i) for i, t in enumerate(texts)]
    assert pipeline.accept_many(0, sent) == len(sent)
    docs = []
    for _ in range(2):
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(pipeline.plan()))]
    assert len(pipeline.cells) >= 20  # the first message of each stream, being answered
    other = BundleModel(recipe_bundle("reverse"))  # the same file opened again: another model object
    assert pipeline.swap(other) is False  # answers in flight: not yet
    in_flight = [len(pipeline.cells)]
    while pipeline.model is not other:
        calls = pipeline.plan()  # the round that swaps admits the next messages, to the new bundle's cells
        assert pipeline.model is other or not any(c.arrivals for c in calls)  # type: ignore[attr-defined]
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(calls))]
        if pipeline.model is not other:
            in_flight.append(len(pipeline.cells))
    assert in_flight == sorted(in_flight, reverse=True) and in_flight[-1] == 0
    while pipeline.busy():
        docs += [orjson.loads(o.value) for o in pipeline.finish(pipeline.execute(pipeline.plan()))]
    assert pipeline.cells.model is other
    tok = pipeline.decoder.tokenizer
    assert tok is not None and sorted(d["offset"] for d in docs) == list(range(len(texts)))
    for d in docs:
        assert d["prediction"]["output_ids"] == answer_one(bundle, tok.encode(texts[d["offset"]])).ids

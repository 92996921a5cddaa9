"""Text → token ids, exactly as the bundle's TokenizerSpec says.

Used on both sides: the training recipes build their vocabularies with it and the daemon
tokenises messages with it, so a model never sees ids produced by a different rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

from .bundle import TokenizerSpec

UNK = "<unk>"
PAD = "<pad>"


class Tokenizer:
    def __init__(self, spec: TokenizerSpec) -> None:
        self.spec = spec
        self._ids = {tok: i for i, tok in enumerate(spec.vocab)}
        self._pattern = re.compile(spec.pattern)

    @property
    def vocab_size(self) -> int:
        return len(self.spec.vocab)

    def split(self, text: str) -> list[str]:
        if self.spec.lowercase:
            text = text.lower()
        if self.spec.level == "char":
            return list(text)
        return self._pattern.findall(text)

    @property
    def unk_id(self) -> int:
        return self.spec.unk_id

    def ids(self, tokens: Iterable[str]) -> list[int]:
        """Unknown tokens map to ``unk_id`` (never an error: text is open-ended)."""
        get, unk = self._ids.get, self.spec.unk_id
        return [get(t, unk) for t in tokens]

    def encode(self, text: str) -> np.ndarray:
        """int64 ids; unknown tokens map to ``unk_id``."""
        return np.asarray(self.ids(self.split(text)), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.spec.vocab[i] for i in ids]

    def join(self, tokens: Iterable[str]) -> str:
        return "".join(tokens) if self.spec.level == "char" else " ".join(tokens)


def build_vocab(
    texts: Iterable[str],
    level: str = "word",
    lowercase: bool = True,
    max_size: int | None = None,
    min_count: int = 1,
    pattern: str = TokenizerSpec.pattern,
) -> TokenizerSpec:
    """A vocabulary from training text: ``<pad>``, ``<unk>``, then tokens by frequency."""
    probe = Tokenizer(TokenizerSpec(level=level, vocab=(PAD, UNK), unk_id=1,  # type: ignore[arg-type]
                                    lowercase=lowercase, pad_id=0, pattern=pattern))
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(probe.split(t))
    ranked = sorted((tok for tok, n in counts.items() if n >= min_count and tok not in (PAD, UNK)),
                    key=lambda tok: (-counts[tok], tok))
    if max_size is not None:
        ranked = ranked[: max(0, max_size - 2)]
    return TokenizerSpec(level=level, vocab=(PAD, UNK, *ranked), unk_id=1,  # type: ignore[arg-type]
                         lowercase=lowercase, pad_id=0, pattern=pattern)

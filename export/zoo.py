"""Reference architectures written to the export protocols: stacked RNN/LSTM/GRU (stateful),
windowed BiLSTM or conv (window), and a GRU encoder–decoder with attention (seq2seq).

``build(**kwargs)`` is the factory ``rnnd export rnnd.export.zoo:build --arg ...`` calls; the
training recipes use it too, so every recipe model is exported by the same path a user's
model takes.
"""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class SeqModel(nn.Module):
    """Input layer (identity on features, or an Embedding over ids) → RNN stack → linear head.

    ``forward(x, h[, c]) -> (y, h[, c])`` with y ``[B, T, out_size]``: regression values,
    class logits or next-token logits, depending on what the head was trained for.
    """

    def __init__(
        self,
        cell: str = "lstm",
        n_features: int = 1,
        vocab_size: int = 0,
        embed_dim: int = 16,
        hidden: int = 32,
        layers: int = 1,
        proj_size: int = 0,
        out_size: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, not {cell!r}")
        if proj_size and cell != "lstm":
            raise ValueError("proj_size is an LSTM option")
        self.cell = cell
        self.embed = nn.Embedding(vocab_size, embed_dim) if vocab_size else None
        kwargs: dict = {"batch_first": True, "num_layers": layers,
                        "dropout": dropout if layers > 1 else 0.0}
        if proj_size:
            kwargs["proj_size"] = proj_size
        self.rnn = CELLS[cell](embed_dim if vocab_size else n_features, hidden, **kwargs)
        self.head = nn.Linear(proj_size or hidden, out_size)

    def forward(self, x: torch.Tensor, *state: torch.Tensor):
        if self.embed is not None:
            x = self.embed(x)
        if self.cell == "lstm":
            y, (h, c) = self.rnn(x, (state[0], state[1]))
            return self.head(y), h, c
        y, h = self.rnn(x, state[0])
        return self.head(y), h


class WindowModel(nn.Module):
    """A non-causal model over a window: bidirectional recurrent layer (or 1-D convolution).

    Served in window mode: the daemon keeps the last W inputs of each stream.
    ``forward(x) -> y[B, out_size]``, the prediction for the window's last step.
    """

    def __init__(
        self,
        kind: str = "bilstm",
        n_features: int = 1,
        vocab_size: int = 0,
        embed_dim: int = 16,
        hidden: int = 32,
        out_size: int = 1,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab_size, embed_dim) if vocab_size else None
        d_in = embed_dim if vocab_size else n_features
        if kind == "bilstm":
            self.body: nn.Module = nn.LSTM(d_in, hidden, batch_first=True, bidirectional=True)
            d_out = 2 * hidden
        elif kind == "conv":
            self.body = nn.Conv1d(d_in, hidden, kernel, padding=kernel // 2)
            d_out = hidden
        else:
            raise ValueError("kind must be 'bilstm' or 'conv'")
        self.head = nn.Linear(d_out, out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        if self.kind == "bilstm":
            y, _ = self.body(x)
        else:
            y = torch.relu(self.body(x.transpose(1, 2))).transpose(1, 2)
        return self.head(y[:, -1])


class Translator(nn.Module):
    """GRU encoder → GRU decoder with Luong ("general") attention and input feeding.

    The decoder's state is its hidden state ``h`` and the attention context it read last
    (``context``, fed back with the next token: input feeding), both ``[B, H]``.
    ``encode(source) -> (memory, h, context)``;
    ``decode_step(token, memory, memory_mask, h, context) -> (logits, h, context)``.
    """

    state_names = ("h", "context")

    def __init__(self, src_vocab: int = 0, n_features: int = 1, tgt_vocab: int = 2, embed_dim: int = 32,
                 hidden: int = 64, bos_id: int = 0, eos_id: int = 1) -> None:
        super().__init__()
        self.bos_id, self.eos_id = bos_id, eos_id
        self.src_embed = nn.Embedding(src_vocab, embed_dim) if src_vocab else None
        self.encoder = nn.GRU(embed_dim if src_vocab else n_features, hidden, batch_first=True)
        self.tgt_embed = nn.Embedding(tgt_vocab, embed_dim)
        self.cell = nn.GRUCell(embed_dim + hidden, hidden)
        self.score = nn.Linear(hidden, hidden, bias=False)
        self.mix = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, tgt_vocab)

    def encode(self, source: torch.Tensor):
        x = self.src_embed(source) if self.src_embed is not None else source
        memory, h = self.encoder(x)
        return memory, h[0], torch.zeros_like(h[0])

    def decode_step(self, token: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, h: torch.Tensor,
                    context: torch.Tensor):
        h = self.cell(torch.cat([self.tgt_embed(token), context], dim=-1), h)
        scores = torch.bmm(memory, self.score(h).unsqueeze(2)).squeeze(2)  # [B, S]
        weights = torch.softmax(scores.masked_fill(~memory_mask, float("-inf")), dim=-1)
        read = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        context = torch.tanh(self.mix(torch.cat([h, read], dim=-1)))
        return self.out(context), h, context

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing (training): logits ``[B, L, V]`` for the inputs ``target_in[B, L]`` (bos first)."""
        memory, h, context = self.encode(source)
        mask = torch.ones(memory.shape[:2], dtype=torch.bool)
        out = []
        for t in range(target_in.shape[1]):
            logits, h, context = self.decode_step(target_in[:, t], memory, mask, h, context)
            out.append(logits)
        return torch.stack(out, dim=1)


def build(arch: str = "seq", **kwargs) -> nn.Module:
    """Factory for ``rnnd export``: ``arch=seq`` (SeqModel), ``window`` (WindowModel) or ``seq2seq`` (Translator)."""
    if arch == "seq":
        return SeqModel(**kwargs)
    if arch == "window":
        return WindowModel(**kwargs)
    if arch == "seq2seq":
        return Translator(**kwargs)
    raise ValueError(f"arch must be 'seq', 'window' or 'seq2seq', not {arch!r}")

"""Reference architectures (stacked RNN/LSTM/GRU; windowed BiLSTM or conv) written to the streaming protocol.

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


def build(arch: str = "seq", **kwargs) -> nn.Module:
    """Factory for ``rnnd export``: ``arch=seq`` (SeqModel) or ``arch=window`` (WindowModel)."""
    if arch == "seq":
        return SeqModel(**kwargs)
    if arch == "window":
        return WindowModel(**kwargs)
    raise ValueError(f"arch must be 'seq' or 'window', not {arch!r}")

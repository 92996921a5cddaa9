"""Models written only for the tests: what a user might bring to `rnnd export`.

None of them comes from rnnd's zoo; each follows (or deliberately breaks) the protocol in
rnnd.export.protocol.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnd.export import StateDecl


class MixedStack(nn.Module):
    """GRU(F→32) → LayerNorm → LSTM(32→16) with a residual projection: state derived automatically."""

    def __init__(self, n_features: int = 3, out_size: int = 2) -> None:
        super().__init__()
        self.gru = nn.GRU(n_features, 32, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.lstm = nn.LSTM(32, 16, batch_first=True)
        self.skip = nn.Linear(32, 16)
        self.head = nn.Linear(16, out_size)

    def forward(self, x, h0, h1, c1):
        a, h0 = self.gru(x, h0)
        a = self.norm(a)
        b, (h1, c1) = self.lstm(a, (h1, c1))
        return self.head(b + self.skip(a)), h0, h1, c1


class HandCell(nn.Module):
    """A hand-written Elman cell from nn.Linear, looped over time in Python; declares its state.

    Tracing unrolls the loop, so the exporter must loop a one-step graph in ONNX instead.
    Also has a learned initial state.
    """

    def __init__(self, n_features: int = 2, hidden: int = 12, out_size: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(n_features, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out_size)
        self.h0 = nn.Parameter(torch.randn(hidden) * 0.5)

    def state_spec(self):
        return [StateDecl("h", (self.rec.in_features,), 0)]

    def initial_state(self):
        return (self.h0.detach(),)

    def forward(self, x, h):
        ys = []
        for t in range(x.shape[1]):
            h = torch.tanh(self.norm(self.inp(x[:, t]) + self.rec(h)))
            ys.append(self.head(h) + x[:, t, :1])  # residual from the first input feature
        return torch.stack(ys, dim=1), h


class TokenTagger(nn.Module):
    """Embedding → 2-layer GRU of one size → LSTM of another → per-step tags."""

    def __init__(self, vocab_size: int = 30, n_tags: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 8)
        self.gru = nn.GRU(8, 24, num_layers=2, batch_first=True)
        self.lstm = nn.LSTM(24, 10, batch_first=True, proj_size=6)
        self.head = nn.Linear(6, n_tags)

    def forward(self, x, h0, h1, c1):
        a, h0 = self.gru(self.emb(x), h0)
        b, (h1, c1) = self.lstm(a, (h1, c1))
        return self.head(b), h0, h1, c1


class BiTagger(nn.Module):
    """Bidirectional: cannot stream; fine in window mode."""

    def __init__(self, n_features: int = 2, out_size: int = 1) -> None:
        super().__init__()
        self.rnn = nn.LSTM(n_features, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, out_size)

    def forward(self, x, *state):
        y, _ = self.rnn(x)
        return self.head(y)


class NoState(nn.Module):
    """Returns only y: breaks the stateful protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 4, batch_first=True)

    def forward(self, x, h):
        y, _ = self.rnn(x, h)
        return y


class ConvStateful(nn.Module):
    """A convolution over time inside a would-be stateful model: refused (use window mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.rnn = nn.GRU(4, 4, batch_first=True)

    def forward(self, x, h):
        y, h = self.rnn(self.conv(x.transpose(1, 2)).transpose(1, 2), h)
        return y, h


class Unexportable(nn.Module):
    """Uses an operation the ONNX exporter has no mapping for."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 4, batch_first=True)

    def forward(self, x, h):
        y, h = self.rnn(x, h)
        return torch.special.zeta(2.0 + y.abs(), torch.full_like(y, 2.0)), h  # finite: x > 1


def mixed_stack(**kw):
    return MixedStack(**kw)


def hand_cell(**kw):
    return HandCell(**kw)


def token_tagger(**kw):
    return TokenTagger(**kw)


def bi_tagger(**kw):
    return BiTagger(**kw)


def no_state(**kw):
    return NoState(**kw)


def conv_stateful(**kw):
    return ConvStateful(**kw)


def unexportable(**kw):
    return Unexportable(**kw)


def not_a_module():
    return {"weights": 1}


# --- styles PyTorch users write that are not the protocol's positional form ---------------------


class TimeFirstLSTM(nn.Module):
    """PyTorch's default layout: nn.LSTM(2, 8) with batch_first=False, x is [T, B, F]."""

    def __init__(self, n_features: int = 2, out_size: int = 1) -> None:
        super().__init__()
        self.rnn = nn.LSTM(n_features, 8)
        self.head = nn.Linear(8, out_size)

    def forward(self, x, h, c):
        y, (h, c) = self.rnn(x, (h, c))
        return self.head(y), h, c


class TupleStateLSTM(nn.Module):
    """forward(x, state=None) -> (y, (h, c)): the state as one tuple, omitted at the start."""

    def __init__(self, n_features: int = 2, out_size: int = 1) -> None:
        super().__init__()
        self.rnn = nn.LSTM(n_features, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, out_size)

    def forward(self, x, state=None):
        y, state = self.rnn(x, state)
        return self.head(y), state


class TimeFirstTupleGRU(nn.Module):
    """Both at once, with two layers of different sizes: forward(x, state=None) -> (y, [h0, h1]), x [T, B, F]."""

    def __init__(self, n_features: int = 3, out_size: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(n_features, 6)
        self.gru = nn.GRU(6, 10)
        self.lstm = nn.LSTM(10, 5)
        self.head = nn.Linear(5, out_size)

    def forward(self, x, state=None):
        h0, hc1 = (None, None) if state is None else (state[0], (state[1], state[2]))
        a, h0 = self.gru(torch.tanh(self.inp(x)), h0)
        b, (h1, c1) = self.lstm(a, hc1)
        return self.head(b), [h0, h1, c1]


class HiddenStart(nn.Module):
    """forward(x, state=None) starts from a learned h0 it does not declare: cannot start from zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, 4, batch_first=True)
        self.h0 = nn.Parameter(torch.ones(1, 1, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, x, state=None):
        if state is None:
            h = self.h0.expand(1, x.shape[0], 4).contiguous()
            state = (h, torch.zeros_like(h))
        y, state = self.rnn(x, state)
        return self.head(y), state


class WindowTransformer(nn.Module):
    """Attention over the window: nn.TransformerEncoder (PyTorch's fused fast path in eval mode)."""

    def __init__(self, n_features: int = 2, d_model: int = 16, out_size: int = 1, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(n_features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 2, 32, dropout=0.1, batch_first=batch_first)
        # Nested tensors need batch_first; asking for them time-first only earns a warning at build.
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(d_model, out_size)

    def forward(self, x):
        z = self.enc(self.inp(x))
        return self.head(z[:, -1] if self.batch_first else z[-1])


class LitWrapper(nn.Module):
    """What a Lightning module's state_dict looks like: the user's model under `model.`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def time_first_lstm(**kw):
    return TimeFirstLSTM(**kw)


def tuple_state_lstm(**kw):
    return TupleStateLSTM(**kw)


def time_first_tuple_gru(**kw):
    return TimeFirstTupleGRU(**kw)


def hidden_start(**kw):
    return HiddenStart(**kw)


def window_transformer(**kw):
    return WindowTransformer(**kw)


def noisy_stack(**kw):
    """A factory that warns the way PyTorch layers and helpers do while a model is built."""
    import warnings

    warnings.warn("this layer is deprecated", DeprecationWarning, stacklevel=1)
    warnings.warn("use batch_first for better inference performance", UserWarning, stacklevel=1)
    return MixedStack(**kw)


class NaNLater(nn.Module):
    """Finite for a stream's first 30 steps, NaN after: its own output, not an export error.

    Counts steps in a declared state; y gets log(30 - t), which is NaN once t > 30.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def state_spec(self):
        return [StateDecl("h", (1, 4), 1), StateDecl("t", (1,), 0)]

    def forward(self, x, h, t):
        y, h = self.rnn(x, h)
        steps = t + torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :]  # [B, T]
        return self.head(y) + torch.log(30.5 - steps)[..., None], h, t + x.shape[1]


class TimeFirstProjected(nn.Module):
    """Time first, tuple state and a projected LSTM (no fused ONNX op: the step graph in Scan)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(2, 8, proj_size=4)
        self.head = nn.Linear(4, 1)

    def forward(self, x, state=None):
        y, state = self.rnn(x, state)
        return self.head(y), state


def time_first_projected(**kw):
    return TimeFirstProjected(**kw)


class Captioner(nn.Module):
    """Image captioning's shape: an image representation (a context vector) becomes the GRU's initial
    state through init(context); the caption's tokens go in one per step, next-token logits come out."""

    def __init__(self, vocab_size: int = 12, context_size: int = 6, hidden: int = 16, embed: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.bridge = nn.Linear(context_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def init(self, context):  # [B, C] -> h0 [1, B, H]
        return torch.tanh(self.bridge(context)).unsqueeze(0)

    def forward(self, x, h):
        out, h = self.gru(self.embed(x), h)
        return self.head(out), h


def captioner(**kw):
    return Captioner(**kw)

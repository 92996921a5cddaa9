"""Drop-in replacements for layers the ONNX exporter cannot emit as fused ops.

ONNX's LSTM op has no output projection, so ``nn.LSTM(proj_size>0)`` cannot be exported
natively. ``StepLSTM`` computes the same function from the same parameters with plain
matrix products; traced at T=1 it becomes the step graph that ``graph.wrap_in_scan`` loops
over time. The swap happens on a copy used only for export: parity is always checked
against the user's original model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class StepLSTM(nn.Module):
    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        m = self.lstm
        proj = m.proj_size
        if not m.batch_first:
            x = x.transpose(0, 1)
        b = x.shape[0]
        if hx is None:
            h0 = x.new_zeros(m.num_layers, b, proj or m.hidden_size)
            c0 = x.new_zeros(m.num_layers, b, m.hidden_size)
        else:
            h0, c0 = hx
        layer_in, hs, cs = x, [], []
        for layer in range(m.num_layers):
            w_ih = getattr(m, f"weight_ih_l{layer}")
            w_hh = getattr(m, f"weight_hh_l{layer}")
            bias = (getattr(m, f"bias_ih_l{layer}") + getattr(m, f"bias_hh_l{layer}")) if m.bias else None
            h, c = h0[layer], c0[layer]
            outs = []
            for t in range(layer_in.shape[1]):
                gates = layer_in[:, t] @ w_ih.T + h @ w_hh.T
                if bias is not None:
                    gates = gates + bias
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if proj:
                    h = h @ getattr(m, f"weight_hr_l{layer}").T
                outs.append(h)
            layer_in = torch.stack(outs, dim=1)
            hs.append(h)
            cs.append(c)
        y = layer_in if m.batch_first else layer_in.transpose(0, 1)
        return y, (torch.stack(hs), torch.stack(cs))


def needs_step_graph(model: nn.Module) -> bool:
    return any(isinstance(m, nn.LSTM) and m.proj_size > 0 for m in model.modules())


def exportable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every projected LSTM replaced by a StepLSTM."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LSTM) and child.proj_size > 0:
                setattr(parent, name, StepLSTM(child))
    return model

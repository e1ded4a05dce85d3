"""optim=lars: timm's LARS as MAE's linear probe uses it (weight matrices adapted, biases not, no weight decay)."""
import pytest
import torch
from timm.optim import Lars
from torch import nn

from pixelformer.optim import build_optimizer
from conftest import tiny_cfg


def test_lars_adapts_the_weight_matrices_only(tmp_path):
    cfg = tiny_cfg(tmp_path, "optim=lars")
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    optimizer = build_optimizer(head, cfg.optim, torch.device("cpu"))
    assert isinstance(optimizer, Lars) and cfg.optim.lr == 6.4 and cfg.optim.weight_decay == 0
    adapted = {tuple(p.ndim for p in g["params"]): g["always_adapt"] for g in optimizer.param_groups}
    assert adapted == {(2,): True, (1,): False}
    # first step (momentum buffers start as the update): the weight moves by lr * trust_coeff * |w| whatever its
    # gradient's size, the bias by lr * its gradient
    before = {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
    nn.functional.cross_entropy(head(torch.randn(8, 16)) * 100, torch.arange(8) % 4).backward()
    grad_bias = head.bias.grad.clone()
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    optimizer.step()
    moved = (head.weight.detach() - before["weight"]).norm().item()
    assert moved == pytest.approx(0.5 * 1e-3 * before["weight"].norm().item(), rel=1e-4)
    assert torch.allclose(head.bias.detach(), before["bias"] - 0.5 * grad_bias)

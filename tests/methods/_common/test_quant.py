"""Fake-quantisation math against hand-computed values (LSQ, arXiv 1902.08153, eq. 1-3, 5)."""

from __future__ import annotations

import math

import pytest
import torch

from methods._common.quant import (
    abs_percentile,
    channel_steps,
    fake_quant,
    grad_scale,
    lsq_grad_scale,
    qmax,
    quantized_weight_bytes,
    round_ste,
    step_from_range,
)


@pytest.mark.parametrize("bits,expected", [(2, 1), (3, 3), (4, 7), (8, 127), (16, 32767)])
def test_qmax_is_symmetric_grid_top(bits, expected):
    assert qmax(bits) == expected


def test_fake_quant_rounds_and_clamps_by_hand():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.25, 0.76, 2.0, -9.0])
    # 3 bits: Qp = 3, step 0.5; x / s = -2, -0.52, 0, 0.48, 0.5 (tie -> even 0), 1.52,
    # 4 (clamped to 3), -18 (clamped to -3)
    out = fake_quant(x, torch.tensor(0.5), 3)
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 0.0, 0.0, 0.0, 1.0, 1.5, -1.5]))


def test_round_ste_ties_to_even_and_passes_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, 2.0, -0.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_input_gradient_is_straight_through_inside_and_zero_outside():
    x = torch.tensor([0.3, -2.9, 5.0, -5.0], requires_grad=True)
    fake_quant(x, torch.tensor(1.0), 3).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_step_gradient_is_lsq_eq3():
    """d q / d s = round(v/s) - v/s inside the range, -Qp / +Qp below / above it."""
    x = torch.tensor([0.3, 0.7, -1.2, 5.0, -5.0])
    step = torch.ones(5, requires_grad=True)
    fake_quant(x, step, 3).sum().backward()
    expected = torch.tensor([0.0 - 0.3, 1.0 - 0.7, -1.0 + 1.2, 3.0, -3.0])
    assert torch.allclose(step.grad, expected, atol=1e-6)


def test_grad_scale_is_identity_forward_scaled_backward():
    x = torch.tensor([2.0, -1.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x.detach())
    (3 * y).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.75, 0.75]))


def test_lsq_gradient_scale_value():
    assert lsq_grad_scale(100, 8) == pytest.approx(1 / math.sqrt(100 * 127))
    assert lsq_grad_scale(9, 3) == pytest.approx(1 / math.sqrt(27))


def test_scaled_step_gradient_end_to_end():
    """LSQ's step gradient times g = 1 / sqrt(N * Qp), N = 2 values sharing the step."""
    x = torch.tensor([0.3, 5.0])
    step = torch.tensor(1.0, requires_grad=True)
    g = lsq_grad_scale(2, 3)
    fake_quant(x, grad_scale(step, g), 3).sum().backward()
    assert step.grad.item() == pytest.approx((-0.3 + 3.0) * g)


def test_min_max_steps_per_tensor_and_per_channel():
    assert step_from_range(torch.tensor(2.54), 8).item() == pytest.approx(0.02)
    w = torch.tensor([[1.0, -3.0], [0.5, 0.25], [0.0, 0.0]])
    steps = channel_steps(w, 3)
    assert steps.shape == (3, 1)
    assert torch.allclose(steps[:2, 0], torch.tensor([1.0, 0.5 / 3]))
    assert steps[2, 0] > 0  # an all-zero channel gets a tiny positive step, not 0
    assert torch.equal(fake_quant(w, steps, 3)[2], torch.zeros(2))
    conv = torch.randn(4, 2, 3, 3)
    assert channel_steps(conv, 8).shape == (4, 1, 1, 1)
    # min-max: the extreme value of every channel is on the grid, so it survives exactly
    q = fake_quant(conv, channel_steps(conv, 8), 8)
    idx = conv.abs().reshape(4, -1).argmax(dim=1)
    assert torch.allclose(q.reshape(4, -1)[range(4), idx], conv.reshape(4, -1)[range(4), idx])


def test_abs_percentile():
    x = -torch.arange(1.0, 101.0)  # |x| = 1..100
    assert abs_percentile(x, 100.0).item() == 100.0
    assert abs_percentile(x, 90.0).item() == 90.0
    assert abs_percentile(x, 99.5).item() == 100.0  # ceil(99.5) -> the 100th smallest


def test_quantized_weight_bytes():
    assert quantized_weight_bytes(10, 4, 2) == 5 + 8  # 40 bits -> 5 bytes, two fp32 steps
    assert quantized_weight_bytes(3, 3, 1) == 2 + 4  # 9 bits round up to 2 bytes
    assert quantized_weight_bytes(1000, 8, 10) == 1000 + 40

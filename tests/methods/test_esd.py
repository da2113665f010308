from __future__ import annotations

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.prepare import PrepareData
from methods._common import erasure as E
from methods._common.training import ddim_scheduler, guided, trainable_copy
from methods.esd import esd_batch, selector
from tests.methods.contract import (
    DiTLike,
    MethodContract,
    changed_while_applied,
    one_line_error,
    prepare_method,
)

TINY = {"steps": 2, "sample_steps": 3, "lr": 1e-3}


def prepare(pipe, params, log=None):
    return prepare_method(pipe, "esd", params, log)


def changed_after_apply(pipe, params) -> set[str]:
    return changed_while_applied(pipe, "esd", params)


class TestESD(MethodContract):
    method = "esd"
    identity_params = {"steps": 1, "sample_steps": 2, "lr": 0.0}  # Adam with lr 0: same weights
    active_params = TINY

    def test_empty_concept_is_one_line_error(self):
        with one_line_error(r"esd.concept=' , ' names no concept"):
            METHODS.get("esd").config({"concept": " , "})

    def test_bad_variant_names_field(self):
        with pytest.raises(DiffbenchError, match=r"esd.variant='xattn' is not allowed"):
            METHODS.get("esd").config({"variant": "xattn"})

    def test_template_without_slot_is_refused(self):
        with pytest.raises(DiffbenchError, match=r"esd.template=.*has no '\{\}'"):
            METHODS.get("esd").config({"template": "a large"})

    def test_transformer_pipeline_is_refused(self):
        with one_line_error("esd needs a text-to-image UNet"):
            METHODS.get("esd").prepare(DiTLike(), METHODS.get("esd").config(TINY),
                                       PrepareData(model="x", prompts=()))


def test_esd_target_hand_values():
    """eps*(x_t) - eta (eps*(x_t, c) - eps*(x_t)): 1 - 2 (3 - 1) = -3; eta 0 gives eps_u."""
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(E.esd_target(u, c, 2.0), torch.tensor([-3.0, -6.0]))
    assert torch.equal(E.esd_target(u, c, 0.0), u)
    assert torch.equal(guided(u, c, 1.0), c)


def test_one_step_lowers_loss_on_fixed_batch(tiny_pipe):
    config = METHODS.get("esd").config({**TINY, "eta": 1.0})
    student = trainable_copy(tiny_pipe.unet, selector(config)).float()
    sched = ddim_scheduler(tiny_pipe, config.sample_steps)
    cond, uncond = E.encode(tiny_pipe, ["red"], "cpu"), E.encode(tiny_pipe, [""], "cpu")
    batch = esd_batch(tiny_pipe, student, tiny_pipe.unet, sched, cond, uncond, config,
                      torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(E.trainable_parameters(student), lr=1e-4)
    before = float(E.batch_loss(student, batch).detach())
    assert E.train_step(student, optimizer, batch) == pytest.approx(before)
    after = float(E.batch_loss(student, batch).detach())
    assert after < before


def test_esd_x_changes_only_cross_attention(tiny_pipe):
    changed = changed_after_apply(tiny_pipe, {**TINY, "variant": "x"})
    assert changed and all(".attn2." in k for k in changed)
    assert any(".attn2.to_q." in k for k in changed)  # ESD-x: all of cross-attention


def test_esd_x_strict_changes_only_cross_attention_kv(tiny_pipe):
    changed = changed_after_apply(tiny_pipe, {**TINY, "variant": "x-strict"})
    kv = {k for k, _ in tiny_pipe.unet.named_parameters() if E.cross_attention_kv(k)}
    assert changed == kv


def test_esd_u_changes_no_cross_attention(tiny_pipe):
    changed = changed_after_apply(tiny_pipe, {**TINY, "variant": "u"})
    assert changed and not any(".attn2." in k for k in changed)
    assert not any(k.startswith(("time_embedding.", "conv_out.")) for k in changed)
    assert any(".attn1." in k for k in changed) and any("resnets" in k for k in changed)


def test_several_concepts_round_robin(tiny_pipe):
    lines: list[str] = []
    _, both = prepare(tiny_pipe, {**TINY, "concept": "red,circle"}, lines.append)
    _, red = prepare(tiny_pipe, TINY)
    assert "'red', 'circle'" in lines[0]
    assert "step 2/2" in lines[-1] and "'circle'" in lines[-1]  # step 2 trains the 2nd concept
    assert any(not torch.equal(both[k], red[k]) for k in red)


def test_template_puts_concept_into_prompts(tiny_pipe):
    lines: list[str] = []
    prepare(tiny_pipe, {**TINY, "template": "a large {},a small {}"}, lines.append)
    assert "'a large red', 'a small red'" in lines[0]
    assert E.concept_prompts(("red", "blue"), "a {} x,{}", "esd") == (
        (0, "a red x"), (0, "red"), (1, "a blue x"), (1, "blue"))


def test_prepare_is_deterministic_from_seed(tiny_pipe):
    _, a = prepare(tiny_pipe, TINY)
    _, b = prepare(tiny_pipe, TINY)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

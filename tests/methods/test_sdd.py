from __future__ import annotations

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.prepare import PrepareData
from methods._common import erasure as E
from methods._common.training import EMA, ddim_scheduler, trainable_copy
from methods.sdd import sdd_batch
from tests.methods.contract import (
    DiTLike,
    MethodContract,
    changed_while_applied,
    one_line_error,
    prepare_method,
)

TINY = {"steps": 2, "sample_steps": 3, "lr": 1e-2, "ema_decay": 0.5}


def prepare(pipe, params, log=None):
    return prepare_method(pipe, "sdd", params, log)


def changed_after_apply(pipe, params) -> set[str]:
    return changed_while_applied(pipe, "sdd", params)


class TestSDD(MethodContract):
    method = "sdd"
    identity_params = {"steps": 1, "sample_steps": 2, "lr": 0.0}  # AdamW with lr 0: same weights
    active_params = TINY

    def test_empty_concept_is_one_line_error(self):
        with one_line_error(r"sdd.concept='' names no concept"):
            METHODS.get("sdd").config({"concept": ""})

    def test_ema_decay_out_of_range_names_field(self):
        with pytest.raises(DiffbenchError, match=r"sdd.ema_decay=1.5 is out of range"):
            METHODS.get("sdd").config({"ema_decay": "1.5"})

    def test_transformer_pipeline_is_refused(self):
        with one_line_error("sdd needs a text-to-image UNet"):
            METHODS.get("sdd").prepare(DiTLike(), METHODS.get("sdd").config(TINY),
                                       PrepareData(model="x", prompts=()))


def fixed_batch(pipe, config, student, teacher):
    sched = ddim_scheduler(pipe, config.sample_steps)
    cond, uncond = E.encode(pipe, ["red"], "cpu"), E.encode(pipe, [""], "cpu")
    return sdd_batch(pipe, student, teacher, sched, cond, uncond, config,
                     torch.Generator().manual_seed(0)), uncond


def test_target_is_teachers_unconditional_estimate(tiny_pipe):
    config = METHODS.get("sdd").config(TINY)
    student = trainable_copy(tiny_pipe.unet, E.cross_attention_kv).float()
    teacher = EMA(student, config.ema_decay)
    batch, uncond = fixed_batch(tiny_pipe, config, student, teacher.module)
    with torch.no_grad():
        expected = teacher.module(batch.x_t, batch.t, encoder_hidden_states=uncond).sample
    assert torch.equal(batch.target, expected)
    assert not batch.target.requires_grad  # stop-gradient


def test_one_step_lowers_loss_on_fixed_batch(tiny_pipe):
    config = METHODS.get("sdd").config(TINY)
    student = trainable_copy(tiny_pipe.unet, E.cross_attention_kv).float()
    batch, _ = fixed_batch(tiny_pipe, config, student, EMA(student, 0.9).module)
    optimizer = torch.optim.AdamW(E.trainable_parameters(student), lr=1e-4)
    before = float(E.batch_loss(student, batch).detach())
    E.train_step(student, optimizer, batch, max_grad_norm=1.0)
    assert float(E.batch_loss(student, batch).detach()) < before


def test_changes_only_cross_attention_kv(tiny_pipe):
    changed = changed_after_apply(tiny_pipe, TINY)
    kv = {k for k, _ in tiny_pipe.unet.named_parameters() if E.cross_attention_kv(k)}
    assert changed == kv
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)


def test_xattn_changes_only_cross_attention(tiny_pipe):
    changed = changed_after_apply(tiny_pipe, {**TINY, "train_params": "xattn"})
    assert changed and all(".attn2." in k for k in changed)
    assert any(".attn2.to_out." in k for k in changed)


def test_artifact_is_the_ema_teacher(tiny_pipe):
    """Decay 1: the teacher never moves, so the final model is the original despite training."""
    _, frozen_teacher = prepare(tiny_pipe, {**TINY, "ema_decay": 1.0})
    original = dict(tiny_pipe.unet.named_parameters())
    assert all(torch.equal(v, original[k]) for k, v in frozen_teacher.items())
    _, moving = prepare(tiny_pipe, TINY)
    assert any(not torch.equal(v, original[k]) for k, v in moving.items())


def test_several_concepts_round_robin(tiny_pipe):
    lines: list[str] = []
    _, both = prepare(tiny_pipe, {**TINY, "concept": "red,circle"}, lines.append)
    _, red = prepare(tiny_pipe, TINY)
    assert "'red', 'circle'" in lines[0]
    assert "step 2/2" in lines[-1] and "'circle'" in lines[-1]  # step 2 trains the 2nd concept
    assert any(not torch.equal(both[k], red[k]) for k in red)


def test_round_robin_and_timestep_interval():
    assert [E.prompt_at(s, 3) for s in range(5)] == [0, 1, 2, 0, 1]
    assert E.ddpm_interval(0, 10, 1000) == (900, 1000)  # x_T: the noisiest tenth
    assert E.ddpm_interval(9, 10, 1000) == (0, 100)
    assert E.ddpm_interval(1, 3, 1000) == (333, 667)

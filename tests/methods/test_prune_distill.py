import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.prepare import ArtifactCache, PrepareData, prepare_artifacts
from harness.steps import StepContext
from methods._common import pool as pooling
from methods._common import unet as U
from methods._common.erasure import esd_target
from methods.prune_distill import (
    distill_loss,
    make_student,
    suppression_loss,
    training_plan,
)
from tests.methods.contract import (
    PROMPTS,
    DiTLike,
    MethodContract,
    one_line_error,
    run,
)
from tests.methods.dit_fixtures import count_calls

TINY = {"steps": 2, "batch_size": 2, "data_size": 2, "data_steps": 1}
REMOVE = ("down_blocks.0.0", "mid_block", "up_blocks.1.1")


class TestPruneDistill(MethodContract):
    method = "prune_distill"
    # nothing removed, distilled with lr = 0: bit-identical to the baseline
    identity_params = {"remove": (), "lr": 0.0, **TINY}
    active_params = {"remove": REMOVE, **TINY}

    def test_report_names_active_parameters_and_removed_blocks(self, tiny_pipe):
        unet = tiny_pipe.unet
        removed = (list(unet.mid_block.parameters())
                   + list(unet.down_blocks[0].resnets[0].parameters())
                   + list(unet.down_blocks[0].attentions[0].parameters())
                   + list(unet.up_blocks[1].resnets[1].parameters())
                   + list(unet.up_blocks[1].attentions[1].parameters()))
        expected = sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in removed)
        with self.apply(tiny_pipe, self.active_params) as handle:
            assert handle.report == {"n_params_active": expected, "blocks_removed": 3}

    def test_suppression_mode_without_concept_is_one_line_error(self, tiny_pipe):
        with pytest.raises(DiffbenchError, match=r"^prune_distill.concept is empty; "
                                                 r"mode='bilevel' needs") as err:
            self.apply(tiny_pipe, {**self.active_params, "mode": "bilevel", "concept": " "})
        assert "\n" not in str(err.value)

    def test_unremovable_unit_is_one_line_error(self, tiny_pipe):
        with pytest.raises(DiffbenchError, match=r"^prune_distill.remove: 'down_blocks.1.0' is "
                                                 r"not a removable unit") as err:
            self.apply(tiny_pipe, {**self.active_params, "remove": ("down_blocks.1.0",)})
        assert "\n" not in str(err.value)

    def test_weights_prepared_for_another_removal_are_refused(self, tiny_pipe):
        spec = METHODS.get("prune_distill")
        config = spec.config(self.active_params)
        artifact = self.artifacts(tiny_pipe, spec, config)
        other = spec.config({**self.active_params, "remove": ("mid_block",)})
        with pytest.raises(DiffbenchError, match="prepared weights are for another UNet"):
            spec.apply(tiny_pipe, other, StepContext(), {"prune_distill": artifact[
                "prune_distill"]})

    def test_transformer_pipeline_is_refused_in_one_line(self):
        with one_line_error("^prune_distill needs a UNet pipeline"):
            self.apply(DiTLike(), self.active_params)


class TestPruneDistillBilevel(TestPruneDistill):
    """The contract again with the bilevel mode (a suppression step after every step)."""

    active_params = {"remove": REMOVE, "mode": "bilevel", "concept": "a red circle",
                     "upper_every": 1, **TINY}


@pytest.mark.parametrize("mode,steps,every,expected", [
    ("distill", 3, 1, "ddd"),
    ("bilevel", 5, 2, "ddsddsd"),
    ("bilevel", 2, 1, "dsds"),
    ("two_stage", 5, 2, "dddddss"),
    ("two_stage", 1, 2, "d"),
])
def test_training_plan(mode, steps, every, expected):
    assert "".join(k[0] for k in training_plan(mode, steps, every)) == expected


def test_suppression_target_hand_values():
    """The upper level's target is ESD's (_common.erasure.esd_target, shared with `esd`)."""
    e_c, e_u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    assert esd_target(e_u, e_c, 1.0).tolist() == [0.0, -1.0]
    assert esd_target(e_u, e_c, 2.0).tolist() == [-0.5, -2.5]
    assert torch.equal(esd_target(e_u, e_c, 0.0), e_u)  # eps(x_t, c) -> eps(x_t, "")


def _batch(pipe, prompts, seed, uncond_prob=0.0):
    gen = torch.Generator().manual_seed(seed)
    pool = pooling.teacher_pool(pipe, prompts, 4, 1, gen)
    return pool, pooling.sample_batch(pipe, pool, 4, gen, uncond_prob=uncond_prob)


def _step(student, loss, lr):
    params = [p for p in student.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_one_distillation_step_lowers_the_loss_and_trains_only_kept_units(tiny_pipe):
    config = METHODS.get("prune_distill").config({"remove": REMOVE})
    student = make_student(tiny_pipe.unet, REMOVE)
    _, batch = _batch(tiny_pipe, PROMPTS, seed=0)
    before = {k: v.clone() for k, v in student.unet.state_dict().items()}
    loss = distill_loss(tiny_pipe, student, batch, config)
    _step(student, loss, 1e-4)
    assert distill_loss(tiny_pipe, student, batch, config) < loss
    changed = {k for k, v in student.unet.state_dict().items() if not torch.equal(v, before[k])}
    removed = U.unit_parameter_names(student.unet, U.select_units(student.unet, REMOVE, "t"))
    assert changed and not changed & removed
    assert all(not student.unet.get_parameter(k).requires_grad for k in removed)
    assert all(not m._forward_hooks for m in tiny_pipe.unet.modules())  # teacher hooks removed


def test_feature_distillation_compares_every_kept_block_output(tiny_pipe):
    config = METHODS.get("prune_distill").config(
        {"remove": REMOVE, "data_weight": 0.0, "out_weight": 0.0, "feat_weight": 1.0})
    student = make_student(tiny_pipe.unet, REMOVE)
    _, batch = _batch(tiny_pipe, PROMPTS, seed=3)
    with torch.no_grad():
        loss = distill_loss(tiny_pipe, student, batch, config)
        student_feats = dict(student.features)
        teacher_feats = {}
        hooks = U.capture_block_outputs(tiny_pipe.unet, teacher_feats, ("mid_block",))
        tiny_pipe.unet(batch.x_t, batch.t, encoder_hidden_states=batch.cond)
        for h in hooks:
            h.remove()
    assert sorted(student_feats) == ["down_blocks.0", "down_blocks.1", "up_blocks.0",
                                     "up_blocks.1"]  # the removed mid block has none
    expected = torch.stack([((student_feats[k] - teacher_feats[k]) ** 2).mean()
                            for k in teacher_feats]).mean()
    assert torch.allclose(loss, expected)


def test_one_suppression_step_lowers_the_suppression_loss(tiny_pipe):
    student = make_student(tiny_pipe.unet, REMOVE)
    pool, batch = _batch(tiny_pipe, ["a red circle"], seed=1)
    loss = suppression_loss(tiny_pipe, student, batch, pool.uncond, 1.0)
    _step(student, loss, 1e-4)
    assert suppression_loss(tiny_pipe, student, batch, pool.uncond, 1.0) < loss


def test_bilevel_suppresses_more_than_distillation_alone(tiny_pipe):
    """Same budget: the interleaved suppression steps leave a lower suppression loss."""
    spec, cache = METHODS.get("prune_distill"), ArtifactCache(None)
    data = PrepareData(model="tiny-sd@none", prompts=tuple(PROMPTS), log=lambda _: None)
    base = {"remove": REMOVE, "concept": "a red circle", "steps": 3, "upper_every": 1,
            "batch_size": 4, "data_size": 4, "data_steps": 1, "lr": 1e-3, "upper_lr": 1e-3}
    pool, batch = _batch(tiny_pipe, ["a red circle"], seed=7)
    unet = tiny_pipe.unet
    with torch.no_grad():  # the dense model's ESD target for the concept
        e_c = unet(batch.x_t, batch.t, encoder_hidden_states=batch.cond).sample
        e_u = unet(batch.x_t, batch.t, encoder_hidden_states=pool.uncond.expand_as(batch.cond)
                   ).sample
    losses = {}
    for mode in ("distill", "bilevel"):
        config = spec.config({**base, "mode": mode})
        artifact = prepare_artifacts(spec, tiny_pipe, config, data, cache)
        with spec.apply(tiny_pipe, config, StepContext(), artifact), torch.no_grad():
            pred = unet(batch.x_t, batch.t, encoder_hidden_states=batch.cond).sample
        losses[mode] = torch.nn.functional.mse_loss(pred, esd_target(e_u, e_c, 1.0))
    assert losses["bilevel"] < losses["distill"]


def test_removed_blocks_are_not_executed_in_generation(tiny_pipe, tiny_spec):
    unet = tiny_pipe.unet
    probes = {"mid": unet.mid_block.resnets[0].conv1,
              "down": unet.down_blocks[0].resnets[0].conv1,
              "down_attn": unet.down_blocks[0].attentions[0].proj_in,
              "up": unet.up_blocks[1].resnets[1].conv1,
              "up_attn": unet.up_blocks[1].attentions[1].proj_in,
              "kept": unet.up_blocks[1].resnets[0].conv1}
    contract = TestPruneDistill()
    contract.model_spec = tiny_spec
    ctx = StepContext()
    with contract.apply(tiny_pipe, contract.active_params, ctx) as handle, \
            count_calls(probes) as counts:
        run(tiny_pipe, tiny_spec, handle, PROMPTS[:1], ctx=ctx, steps=4)
    counts = {name: counts[name] for name in probes}
    assert counts == {"mid": 0, "down": 0, "down_attn": 0, "up": 0, "up_attn": 0, "kept": 4}


def test_remove_names_from_a_cli_string_are_normalised():
    spec = METHODS.get("prune_distill")
    assert spec.config({"remove": "mid_block, up_blocks.1.1"}).remove == ("mid_block",
                                                                          "up_blocks.1.1")
    assert spec.config({"remove": ""}).remove == ()


def test_training_data_come_from_train_prompts_and_concept_prompts(tiny_pipe, monkeypatch):
    """Distillation data from `train_prompts` (else the cell's prompts); suppression data from
    every comma-separated concept prompt."""
    seen = []
    real_pool = pooling.teacher_pool

    def spy(pipe, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real_pool(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(pooling, "teacher_pool", spy)
    spec = METHODS.get("prune_distill")
    data = PrepareData(model="tiny-sd@none", prompts=("cell prompt",), log=lambda _: None)
    config = spec.config({"remove": REMOVE, "mode": "bilevel", "upper_every": 1, **TINY,
                          "concept": "a large red, a small red", "train_prompts": "general"})
    prepare_artifacts(spec, tiny_pipe, config, data, ArtifactCache(None))
    from harness.prompts import load_prompts

    assert seen == [list(load_prompts("general").texts), ["a large red", "a small red"]]
    seen.clear()
    prepare_artifacts(spec, tiny_pipe, spec.config({"remove": REMOVE, **TINY}), data,
                      ArtifactCache(None))
    assert seen == [["cell prompt"]]

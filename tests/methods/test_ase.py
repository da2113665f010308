import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.prepare import PrepareData
from harness.steps import StepContext
from methods._common import pool as pooling
from methods.ase import (
    ASEConfig,
    ExitDepth,
    drop_table,
    drops_at,
    exit_loss,
    make_student,
    trainable,
)
from tests.methods.contract import (
    PROMPTS,
    DiTLike,
    MethodContract,
    one_line_error,
    run,
)
from tests.methods.dit_fixtures import on_model

TINY = {"steps": 2, "batch_size": 2, "data_size": 2, "data_steps": 1}


class TestASE(MethodContract):
    method = "ase"
    # all blocks at every timestep, fine-tuned with lr = 0: bit-identical to the baseline
    identity_params = {"drop_max": 0, "lr": 0.0, **TINY}
    active_params = {"drop_max": 3, **TINY}

    def test_report_names_active_parameters_and_removed_blocks(self, tiny_pipe):
        with self.apply(tiny_pipe, self.active_params) as handle:
            total = sum(p.numel() for p in tiny_pipe.unet.parameters())
            assert handle.report == {"n_params_active": total, "blocks_removed": 3}

    def test_fine_tuned_weights_are_swapped_in_and_restored(self, tiny_pipe):
        before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
        with self.apply(tiny_pipe, self.active_params):
            changed = [k for k, v in tiny_pipe.unet.state_dict().items()
                       if not torch.equal(v, before[k])]
            assert changed and not any(k.startswith("time_embedding.") for k in changed)
        assert all(torch.equal(v, before[k]) for k, v in tiny_pipe.unet.state_dict().items())

    def test_drop_max_beyond_the_unet_names_allowed_range(self, tiny_pipe):
        message = r"^ase.drop_max=6 is out of range for this UNet; allowed \[0, 5\]$"
        with pytest.raises(DiffbenchError, match=message):
            self.apply(tiny_pipe, {**self.active_params, "drop_max": 6})

    def test_pipeline_without_a_denoiser_is_refused_in_one_line(self):
        with one_line_error("^ase needs a transformer .* or a UNet .*; DiTLike has neither"):
            self.apply(DiTLike(), self.active_params)


TINY_T = {**TINY, "target": "teacher"}  # transformers distil on their pipeline's calls


class TransformerASE(MethodContract):
    """ASE on a transformer: the last blocks exit at high noise, distilled on the model's calls."""

    method = "ase"
    identity_params = {"drop_max": 0, "lr": 0.0, **TINY_T}
    active_params = {"drop_max": 2, **TINY_T}

    def test_last_blocks_run_only_at_low_noise(self, tiny_pipe, tiny_spec):
        """Schedule "step" over the noisiest half: the last block skips exactly those calls."""
        params = {"drop_max": 1, "schedule": "step", "until": 0.5, "steps": 0}
        transformer = tiny_pipe.transformer
        last = (transformer.single_transformer_blocks[-1] if getattr(
            transformer, "single_transformer_blocks", None) else transformer.transformer_blocks[-1])
        seen, ran = [], []
        pre = transformer.register_forward_pre_hook(
            lambda m, a, k: seen.append(float(torch.as_tensor(k["timestep"]).reshape(-1)[0])),
            with_kwargs=True)
        # the attention inside it: a skipped block's own hooks still fire, its children do not
        post = last.attn.register_forward_hook(lambda *_: ran.append(len(seen)))
        try:
            ctx = StepContext()
            with self.apply(tiny_pipe, params, ctx) as handle:
                run(tiny_pipe, tiny_spec, handle, PROMPTS[:1], ctx=ctx, steps=6)
        finally:
            pre.remove()
            post.remove()
        unit = 1000.0 if type(transformer).__name__.startswith("Flux") else 1.0
        expected = [i + 1 for i, t in enumerate(seen) if round(t * unit) < 500]
        assert ran == expected and 0 < len(ran) < len(seen)

    def test_noise_target_is_refused_in_one_line(self, tiny_pipe):
        with one_line_error("^ase.target='noise' trains on the UNet's epsilon loss; on "):
            self.apply(tiny_pipe, {"drop_max": 1, **TINY})

    def test_distillation_trains_all_but_the_time_embedders(self, tiny_pipe):
        spec = METHODS.get("ase")
        config = spec.config({**self.active_params, "steps": 3, "lr": 1e-3})
        artifact = spec.prepare(tiny_pipe, config, self.prepare_data())
        changed = [k for k in artifact if k != "ase.drop_table"]
        assert changed and not any(k.startswith(("time_text_embed.", "adaln_single."))
                                   or ".timestep_embedder." in k for k in changed)


@pytest.mark.parametrize("drop_max,schedule,until,expected", [
    (2, "linear", 0.5, [0, 0, 0, 0, 0, 1, 1, 2, 2, 2]),  # k = ceil(2 (1 - (9 - t) / 5))
    (3, "step", 0.3, [0, 0, 0, 0, 0, 0, 0, 3, 3, 3]),
    (4, "linear", 0.0, [0] * 10),
    (0, "linear", 1.0, [0] * 10),
])
def test_drop_table_hand_values(drop_max, schedule, until, expected):
    assert drop_table(10, drop_max, schedule, until).tolist() == expected


def test_high_noise_timesteps_get_fewer_blocks():
    table = drop_table(1000, 5, "linear", 0.8)
    assert table[999] == 5 and table[0] == 0 and table[199] == 0 and table[200] == 1
    assert all(a <= b for a, b in zip(table.tolist(), table[1:].tolist()))  # more noise, more drop


def test_drops_at_reads_any_timestep_form():
    table = torch.arange(10)
    assert drops_at(table, 3).tolist() == [3]
    assert drops_at(table, 6.6).tolist() == [7]  # Euler-style float timesteps round
    assert drops_at(table, torch.tensor([12, -1])).tolist() == [9, 0]  # clamped


@pytest.mark.parametrize("k", range(6))
def test_every_allowed_depth_keeps_shapes_valid(tiny_pipe, k):
    student, depth = make_student(tiny_pipe.unet, 5)
    depth.k = k
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        out = student(x, torch.tensor([999, 999]),
                      encoder_hidden_states=torch.randn(2, 7, 32, generator=gen)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def _fixed_batch(pipe, seed=0, t=(999, 10, 900, 50)):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(t), 4, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor(t)
    return pooling.Batch(x_t=pipe.scheduler.add_noise(x0, noise, t), t=t, noise=noise, x0=x0,
                    cond=torch.randn(len(t), 7, 32, generator=gen))


def test_exit_loss_evaluates_each_sample_at_its_depth(tiny_pipe):
    """Hand-computed: per-sample squared errors at k(t), averaged over all elements."""
    student, depth = make_student(tiny_pipe.unet, 3)
    table = drop_table(1000, 3, "step", 0.5)
    batch = _fixed_batch(tiny_pipe)
    with torch.no_grad():
        loss = exit_loss(student, depth, table, batch, batch.noise)
        errors = []
        for i, k in enumerate([3, 0, 3, 0]):
            depth.k = k
            pred = student(batch.x_t[i:i + 1], batch.t[i:i + 1],
                           encoder_hidden_states=batch.cond[i:i + 1]).sample
            errors.append(((pred - batch.noise[i:i + 1]) ** 2).sum())
    assert torch.allclose(loss, torch.stack(errors).sum() / batch.noise.numel())
    assert drops_at(table, batch.t).tolist() == [3, 0, 3, 0]


def test_one_fine_tune_step_lowers_the_loss_and_trains_only_what_it_should(tiny_pipe):
    student, depth = make_student(tiny_pipe.unet, 3)
    table = drop_table(1000, 3, "step", 0.5)
    batch = _fixed_batch(tiny_pipe, seed=1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    loss = exit_loss(student, depth, table, batch, batch.noise)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = exit_loss(student, depth, table, batch, batch.noise)
    assert after < loss
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(trainable(k) for k in changed)
    assert not any(k.startswith("time_embedding.") for k in changed)
    assert [k for k in before if k.startswith("time_embedding.")]  # frozen, not absent


def _record_depths(unet):
    """Per UNet call: [timestep, whether the mid block (unit rank 0) ran]; and the hooks."""
    calls = []

    def on_call(module, args, kwargs):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append([float(torch.as_tensor(timestep).reshape(-1)[0]), False])

    def on_mid(*_):
        calls[-1][1] = True

    return calls, [unet.register_forward_pre_hook(on_call, with_kwargs=True),
                   unet.mid_block.resnets[0].conv1.register_forward_hook(on_mid)]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_depth_follows_the_timestep_for_ddim_and_dpm_solver(tiny_pipe, tiny_spec, scheduler):
    """The same noise level gets the same depth whatever the solver and its timestep spacing."""
    from diffusers import DPMSolverMultistepScheduler

    spec = METHODS.get("ase")
    config = spec.config({"drop_max": 2, "schedule": "step", "until": 0.5, "steps": 0})
    artifact = {"ase": spec.prepare(tiny_pipe, config, PrepareData("tiny-sd", ()))}
    original = tiny_pipe.scheduler
    if scheduler == "dpm":
        tiny_pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    ctx = StepContext()
    try:
        with spec.apply(tiny_pipe, config, ctx, artifact) as handle:
            calls, hooks = _record_depths(tiny_pipe.unet)
            try:
                run(tiny_pipe, tiny_spec, handle, PROMPTS[:1], ctx=ctx, steps=7)
            finally:
                for h in hooks:
                    h.remove()
    finally:
        tiny_pipe.scheduler = original
    assert len(calls) == 7
    assert [ran for _, ran in calls] == [t < 500 for t, _ in calls]
    assert any(ran for _, ran in calls) and not all(ran for _, ran in calls)


def test_config_defaults_are_documented_and_in_range():
    config = METHODS.get("ase").config({})
    assert isinstance(config, ASEConfig) and config.target == "noise"
    with pytest.raises(DiffbenchError, match=r"ase.target='eps' is not allowed"):
        METHODS.get("ase").config({"target": "eps"})


def test_exit_depth_refuses_a_call_mixing_depths():
    hook = ExitDepth().from_timestep(drop_table(1000, 2, "step", 0.5))
    with pytest.raises(DiffbenchError, match="mixes timesteps with different exit depths"):
        hook(None, (torch.zeros(2, 4, 8, 8), torch.tensor([999, 10])), {})


TestASEOnMiniSD3 = on_model(TransformerASE, "sd3")

TestASEOnTinyFlux = on_model(TransformerASE, "flux")

TestASEOnTinySD3 = on_model(TransformerASE, "tiny_sd3")

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from methods.solver import SCHEDULERS
from tests.methods.contract import PROMPTS, MethodContract, run


class TestSolver(MethodContract):
    method = "solver"
    identity_params = {"scheduler": "ddim"}  # tiny-sd's own scheduler family and step count
    active_params = {"scheduler": "dpmpp", "steps": 4}

    @pytest.mark.parametrize("name", sorted(SCHEDULERS))
    def test_every_scheduler_generates(self, name, tiny_pipe, tiny_spec):
        spec = METHODS.get("solver")
        with spec.apply(tiny_pipe, spec.config({"scheduler": name, "steps": 3}),
                        __import__("harness.steps").steps.StepContext()) as handle:
            assert type(tiny_pipe.scheduler).__name__ == SCHEDULERS[name][0]
            images = run(tiny_pipe, tiny_spec, handle, PROMPTS[:1])
        assert images.shape == (1, 32, 32, 3) and images.float().std() > 0
        assert type(tiny_pipe.scheduler).__name__ == "DDIMScheduler"

    def test_bad_scheduler_names_choices(self):
        with pytest.raises(DiffbenchError, match="choose one of"):
            METHODS.get("solver").config({"scheduler": "heunn"})

    def test_step_override_reaches_the_pipeline(self, tiny_pipe, tiny_spec):
        from harness.steps import StepContext

        spec, ctx = METHODS.get("solver"), StepContext()
        with spec.apply(tiny_pipe, spec.config({"scheduler": "unipc", "steps": 4}), ctx) as h:
            run(tiny_pipe, tiny_spec, h, PROMPTS[:1], ctx=ctx)
        assert ctx.num_steps == 4 and ctx.step == 4
        assert torch.is_tensor(tiny_pipe.scheduler.betas)


class TestFlowSolver:
    """On a flow-matching pipeline (SD3 MMDiT) DPM-Solver++ / UniPC run in their flow form."""

    @pytest.fixture()
    def sd3(self):
        from harness.models import MODELS, load_pipeline

        spec = MODELS.get("mini-sd3")
        return load_pipeline(spec, "none", torch.float32, "cpu"), spec

    @pytest.mark.parametrize("name", ["dpmpp", "unipc"])
    def test_flow_form_matches_the_pipelines_euler_at_many_steps(self, sd3, name):
        from harness.steps import StepContext

        pipe, spec = sd3
        spec_m = METHODS.get("solver")
        base = run(pipe, spec, None, PROMPTS[:1], steps=16).float()
        with spec_m.apply(pipe, spec_m.config({"scheduler": name}), StepContext()) as handle:
            sch = pipe.scheduler
            assert sch.config.prediction_type == "flow_prediction" and sch.config.use_flow_sigmas
            images = run(pipe, spec, handle, PROMPTS[:1], steps=16).float()
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        # the same ODE: within a few uint8 levels of the pipeline's own Euler solver; an
        # epsilon-form solver on a velocity model is off by far more
        assert (images - base).abs().mean() < 3.0

    @pytest.mark.parametrize("name", ["ddim", "euler", "euler-a"])
    def test_solvers_without_a_flow_form_are_refused(self, sd3, name):
        from harness.steps import StepContext

        spec_m = METHODS.get("solver")
        with pytest.raises(DiffbenchError, match="has no flow-matching form"):
            spec_m.apply(sd3[0], spec_m.config({"scheduler": name}), StepContext())

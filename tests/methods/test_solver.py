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

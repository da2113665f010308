"""`diffbench train-mini --stage all-mmdit` at toy size: trains, checkpoints, resumes, assembles
a StableDiffusion3Pipeline folder that loads and generates."""

import json

import torch

from harness.mini.train.cli import main


def test_mmdit_stage_trains_resumes_and_assembles(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "assets"
    base = ["--work", str(work), "--out", str(out), "--pool", "256", "--mmdit-batch", "4",
            "--log-every", "1", "--threads", "1"]
    assert main(["--stage", "mmdit", "--mmdit-steps", "2", *base]) == 0
    state = json.loads((work / "mmdit" / "state.json").read_text())
    assert state["step"] == 2 and (work / "mmdit" / "final" / "config.json").is_file()
    assert main(["--stage", "mmdit", "--mmdit-steps", "4", "--force", *base]) == 0
    captured = capsys.readouterr()
    assert "resumed at step 2" in captured.out + captured.err
    assert json.loads((work / "mmdit" / "state.json").read_text())["step"] == 4
    assert main(["--stage", "assemble-mmdit", *base]) == 0
    from diffusers import StableDiffusion3Pipeline

    from harness.mini.mmdit import NO_T5, sd3_kwargs

    pipe = StableDiffusion3Pipeline.from_pretrained(str(out / "mini-sd3"), **NO_T5)
    images = pipe(**sd3_kwargs(["a large red circle on a blue background"], 2, 4.0, 32,
                               [torch.Generator().manual_seed(0)])).images
    assert images.shape == (1, 3, 32, 32)
    info = json.loads((out / "mini-sd3" / "training.json").read_text())
    assert info["mmdit"]["step"] == 4

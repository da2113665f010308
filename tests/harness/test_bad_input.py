"""Bad input, every probe of issue 13: exit 2, one line on stderr, no traceback, nothing written.

Each probe is (id, argv with {tmp} and {out} placeholders, files to create under {tmp}, a
substring of the message). Run in process through `harness.cli.main`.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from harness.cli import main

RUN = ["run", "--out", "{out}", "--no-progress", "--model", "tiny-sd", "--device", "cpu"]
SUITE_HEAD = 'name = "s"\n[defaults]\nmodel = "tiny-sd"\ndevice = "cpu"\n'


def truncated_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 7


PIPELINE = {"w/model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline",
                                            "unet": ["diffusers", "UNet2DConditionModel"]})}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

PROBES = [
    # prompt sets and files
    ("unknown prompt set", [*RUN, "--prompts", "shapez"], {}, "did you mean 'shapes'"),
    ("n_images above the set", [*RUN, "--prompts", "general", "--n-images", "25"], {},
     "has 24 prompts, but 25"),
    ("empty prompt file", [*RUN, "--prompts", "{tmp}/p.txt"], {"p.txt": "\n# only a comment\n"},
     "no prompts in"),
    ("no caption column", [*RUN, "--prompts", "{tmp}/p.csv"], {"p.csv": "id,words\n1,a cat\n"},
     "p.csv:1: no prompt column"),
    ("short CSV row", [*RUN, "--prompts", "{tmp}/p.csv"], {"p.csv": "id,caption\n1,a\n2\n"},
     "p.csv:3: expected 2 fields"),
    ("non-UTF-8 prompt file", [*RUN, "--prompts", "{tmp}/p.txt"], {"p.txt": b"a\n\xff b\n"},
     "p.txt:2: not UTF-8 text"),
    ("I2P seed out of range", [*RUN, "--prompts", "{tmp}/i2p.csv"],
     {"i2p.csv": f"prompt,sd_seed,sd_guidance_scale\na cat,{2**64},7\n"}, "i2p.csv:2: bad sd_seed"),
    ("unterminated CSV quote", [*RUN, "--prompts", "{tmp}/p.csv"],
     {"p.csv": 'caption\nok\n"a cat\nb dog\n'}, "p.csv:3: bad quoting"),
    # settings
    ("resolution not a multiple", [*RUN, "--resolution", "36"], {}, "needs a multiple of 8"),
    ("resolution of a fixed-size model", [*RUN, "--model", "tiny-dit", "--resolution", "64"], {},
     "generates 32x32 only"),
    ("unknown device", [*RUN, "--device", "tpu9"], {}, "device='tpu9' is not a device"),
    pytest.param("cuda without CUDA", [*RUN, "--device", "cuda"], {}, "no CUDA device",
                 marks=NO_CUDA, id="cuda without CUDA"),
    ("guidance nan", [*RUN, "--guidance", "nan"], {}, "settings.guidance=nan is not a finite"),
    ("method param nan", [*RUN, "--method", "tome:ratio=nan"], {}, "is not a finite number"),
    ("timing nan", [*RUN, "--timing", "target=nan"], {}, "timing.target=nan is not a finite"),
    ("unknown model", [*RUN, "--model", "sd-15"], {}, "did you mean"),
    # weights folders
    ("weights folder missing", [*RUN, "--weights", "{tmp}/nope"], {}, "no folder at"),
    ("weights folder empty", [*RUN, "--weights", "{tmp}/w"], {"w/.keep": ""},
     "has no model_index.json"),
    ("weights index corrupt", [*RUN, "--weights", "{tmp}/w"], {"w/model_index.json": "{nope"},
     "model_index.json is not valid JSON"),
    ("weights component missing", [*RUN, "--weights", "{tmp}/w"], PIPELINE,
     "names component 'unet'"),
    ("weights truncated", [*RUN, "--weights", "{tmp}/w"],
     {**PIPELINE, "w/unet/diffusion_pytorch_model.safetensors": truncated_safetensors()},
     "truncated"),
    # suite files
    ("suite not found", ["run", "--suite", "defualt"], {}, "did you mean 'default'"),
    ("suite is a folder", ["run", "--suite", "{tmp}"], {}, "is a folder"),
    ("suite is binary", ["run", "--suite", "{tmp}/s.toml"], {"s.toml": b"\x89PNG\x00\xff"},
     "not UTF-8 text"),
    ("defaults not a table", ["run", "--suite", "{tmp}/s.toml"], {"s.toml": "defaults = 5\n"},
     "'defaults' must be a table"),
    ("methods a string", ["run", "--suite", "{tmp}/s.toml"],
     {"s.toml": 'methods = "baseline"\n'}, "'methods' must be an array"),
    ("params a string", ["run", "--suite", "{tmp}/s.toml"],
     {"s.toml": SUITE_HEAD + '[[methods]]\nname = "tome"\nparams = "x"\n'}, "methods[0]"),
    ("metrics a string", ["run", "--suite", "{tmp}/s.toml"],
     {"s.toml": 'metrics = "fd_clip"\n'}, "'metrics' must be an array"),
    ("metric options not a table", ["run", "--suite", "{tmp}/s.toml"],
     {"s.toml": "[metric_options]\nfd_clip = 3\n"}, "is not a table"),
    ("metric option typo", ["run", "--suite", "{tmp}/s.toml"],
     {"s.toml": "[metric_options.fid]\nrefrence = 'x.npz'\n"}, "did you mean 'reference'"),
    ("unknown metric", ["run", "--suite", "{tmp}/s.toml"], {"s.toml": 'metrics = ["fdclip"]\n'},
     "did you mean 'fd_clip'"),
    ("suite name climbs out", ["run", "--suite", "{tmp}/s.toml"],
     {"s.toml": 'name = "../../x"\n'}, "is not a safe name"),
    ("suite name absolute", ["run", "--suite", "{tmp}/s.toml"], {"s.toml": 'name = "/x"\n'},
     "is not a safe name"),
    # the other subcommands
    ("leaderboard: no run", ["leaderboard", "{tmp}"], {}, "no cell results"),
    ("leaderboard: csv under a file", ["leaderboard", "{tmp}/r", "--csv", "{tmp}/f/x.csv"],
     {"r/cells/.keep": "", "f": "x"}, "is not a writable folder"),
    ("score: no run", ["score", "{tmp}"], {}, "not a diffbench run folder"),
    ("score: unknown metric", ["score", "{tmp}", "--metrics", "fidd"], {}, "did you mean"),
    ("report: no run", ["report", "{tmp}/nope"], {}, "run folder not found"),
    ("report: not a leaderboard", ["report", "{tmp}/r"], {"r/leaderboard.csv": "a,b\n1,2\n"},
     "is not a diffbench leaderboard"),
    ("compare: missing file", ["compare", "{tmp}/a.csv", "{tmp}/nope.csv"], {"a.csv": "x\n"},
     "leaderboard not found"),
    ("compare: other columns", ["compare", "{tmp}/a.csv", "{tmp}/a.csv"],
     {"a.csv": "a,b\n1,2\n"}, "is not a diffbench leaderboard"),
    ("compare: binary garbage", ["compare", "{tmp}/a.csv", "{tmp}/a.csv"],
     {"a.csv": b"\x00\xff\xfe garbage"}, "not UTF-8 text"),
    ("compare: empty reference", ["compare", "{tmp}/a.csv", "{tmp}/a.csv"],
     {"a.csv": "model,method,params,config_hash,status\n"}, "has no rows"),
    ("compare: tol nan", ["compare", "{tmp}/a.csv", "{tmp}/a.csv", "--tol", "latency_s=nan"],
     {"a.csv": "x\n"}, "finite number"),
    ("compare: tol typo", ["compare", "{tmp}/a.csv", "{tmp}/a.csv", "--tol", "latncy_s=0.1"],
     {"a.csv": "x\n"}, "did you mean 'latency_s'"),
]


def materialise(tmp_path, argv, files):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return [a.replace("{tmp}", str(tmp_path)).replace("{out}", str(tmp_path / "out"))
            for a in argv]


@pytest.mark.parametrize("name, argv, files, message", PROBES,
                         ids=[p[0] if isinstance(p, tuple) else p.id for p in PROBES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, name,
                                                         argv, files, message):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here
    argv = materialise(tmp_path, argv, files)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("diffbench: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written

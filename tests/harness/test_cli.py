import pytest

from harness.cli import main


def test_unknown_method_is_one_line_did_you_mean_exit_2(capsys):
    assert main(["run", "--method", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown method 'nosuch'; did you mean" in err


def test_misspelt_method_suggests(capsys):
    assert main(["run", "--method", "deepcach"]) == 2
    assert "did you mean 'deepcache'" in capsys.readouterr().err


def test_bad_parameter_names_field_and_range(capsys):
    assert main(["run", "--method", "deepcache:interval=0"]) == 2
    assert "deepcache.interval=0 is out of range; allowed [1, 1000]" in capsys.readouterr().err


def test_param_without_method(capsys):
    assert main(["run", "--param", "interval=2"]) == 2


def test_bad_flag_is_argparse_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["run", "--steps", "many"])
    assert exc.value.code == 2


@pytest.mark.parametrize("what,expected", [("methods", "deepcache"), ("models", "sd15"),
                                           ("metrics", "latency"), ("prompts", "shapes")])
def test_list(capsys, what, expected):
    assert main(["list", what]) == 0
    assert expected in capsys.readouterr().out


def test_run_leaderboard_and_compare(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--method", "baseline", "--method", "deepcache:interval=2", "--steps", "4",
            "--n-images", "2", "--batch-size", "2",
            "--timing", "min_rounds=2,max_rounds=2,calls=1,warmup=0",
            "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "deepcache" in printed and "leaderboard:" in printed
    (out / "leaderboard.csv").unlink()
    assert main(["leaderboard", str(out)]) == 0
    csv = out / "leaderboard.csv"
    assert csv.exists()
    assert main(["compare", str(csv), str(csv)]) == 0
    rows = list(__import__("csv").DictReader(csv.open()))
    faster_ref = tmp_path / "faster.csv"  # a reference twice as fast: the new run regressed
    with faster_ref.open("w", newline="") as fh:
        writer = __import__("csv").DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "speedup": str(2 * float(r["speedup"]))} for r in rows)
    assert main(["compare", str(csv), str(faster_ref)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert main(["compare", str(csv), str(csv), "--tol", "latency_s=lower:-2"]) == 2
    assert main(["compare", str(tmp_path / "nope.csv"), str(csv)]) == 2


def test_workers_need_the_ray_backend(capsys):
    assert main(["run", "--method", "baseline", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "--workers needs --backend ray" in err and err.count("\n") == 1


def test_train_mini_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train-mini", "--help"])
    assert exit_.value.code == 0 and "--unet-steps" in capsys.readouterr().out

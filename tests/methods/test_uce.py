from __future__ import annotations

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.prepare import PrepareData
from methods._common import erasure as E
from methods.uce import (
    aligned_rows,
    concept_keys,
    cross_attention_layers,
    preserve_keys,
    token_counts,
    uce_closed_form,
)
from tests.methods.contract import PROMPTS, DiTLike, MethodContract, one_line_error


def prepare(pipe, params, log=None):
    spec = METHODS.get("uce")
    config = spec.config(params)
    data = PrepareData(model="tiny-sd@none", prompts=tuple(PROMPTS),
                       log=log if log is not None else (lambda _: None))
    return config, spec.prepare(pipe, config, data)


class TestUCE(MethodContract):
    method = "uce"
    identity_params = {"concept": ""}  # nothing erased: the original weights
    active_params = {"concept": "red"}

    def test_guide_count_mismatch_is_one_line_error(self):
        with one_line_error(r"uce.guide='a,b' names 2 guides for 3"):
            METHODS.get("uce").config({"concept": "red,blue,green", "guide": "a,b"})

    def test_negative_scale_names_field(self):
        with pytest.raises(DiffbenchError, match=r"uce.ridge=-1.0 is out of range"):
            METHODS.get("uce").config({"ridge": -1})

    def test_transformer_pipeline_is_refused(self):
        with one_line_error("uce needs a text-to-image UNet"):
            METHODS.get("uce").prepare(DiTLike(), METHODS.get("uce").config({}),
                                       PrepareData(model="x", prompts=()))


def random_problem(seed: int, out: int = 5, d: int = 4, n: int = 3, m: int = 6):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return rand(out, d), rand(d, n), rand(out, n), rand(d, m)


@pytest.mark.parametrize("seed,e,p,r,m", [(0, 1.0, 0.1, 0.5, 6), (1, 2.0, 3.0, 0.0, 6),
                                          (2, 1.0, 0.0, 1e-3, 0), (3, 0.5, 1.0, 2.0, 2)])
def test_closed_form_matches_least_squares(seed, e, p, r, m):
    """W* minimises e||W'K - V||^2 + p||W'P - WP||^2 + r||W' - W||^2: a stacked lstsq solve."""
    w, keys, values, kept = random_problem(seed, m=m)
    got = uce_closed_form(w, keys, values, kept, e, p, r)
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    x = torch.cat([e ** 0.5 * keys, p ** 0.5 * kept, r ** 0.5 * eye], dim=1)  # d x (n + m + d)
    y = torch.cat([e ** 0.5 * values, p ** 0.5 * w @ kept, r ** 0.5 * w], dim=1)
    want = torch.linalg.lstsq(x.T, y.T).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_closed_form_hand_values():
    """1-D: W = 2, one key c = 1 sent to v* = 0, ridge 1: W* = (0 + 1*2) / (1 + 1) = 1."""
    one = torch.ones(1, 1, dtype=torch.float64)
    assert uce_closed_form(2 * one, one, 0 * one, torch.zeros(1, 0, dtype=torch.float64),
                           1.0, 0.0, 1.0).item() == pytest.approx(1.0)
    # preserved key c_j = 1 at p = 3 pulls back to W: (0 + 3*2 + 1*2) / (1 + 3 + 1) = 8 / 5
    assert uce_closed_form(2 * one, one, 0 * one, one, 1.0, 3.0, 1.0).item() == pytest.approx(1.6)


def test_singular_keys_are_one_line_error():
    """One key in 4 dimensions, no preservation, no ridge: K K^T = diag(1, 0, 0, 0)."""
    w, _, _, _ = random_problem(0)
    key = torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    with one_line_error("ridge > 0"):
        uce_closed_form(w, key, w @ key, torch.zeros(4, 0, dtype=torch.float64), 1.0, 0.0, 0.0)


def test_aligned_rows_from_last_word_token():
    # "red" = [start, red, end] (3 tokens) vs "" = [start, end]: red<->start, end<->end, ...
    assert aligned_rows(3, 2, 8) == (range(1, 8), range(0, 7))
    # guide longer than the concept: both start at their last word, the shorter run decides
    assert aligned_rows(3, 5, 8) == (range(1, 6), range(3, 8))
    assert aligned_rows(4, 4, 8) == (range(2, 8), range(2, 8))


def test_closed_form_maps_few_keys_exactly():
    """n <= d keys, no preservation, vanishing ridge: W* c_i = v_i* exactly (UCE's edit)."""
    w, keys, values, _ = random_problem(4, n=3)
    got = uce_closed_form(w, keys, values, torch.zeros(4, 0, dtype=torch.float64), 1.0, 0.0,
                          1e-12)
    torch.testing.assert_close(got @ keys, values, rtol=0, atol=1e-8)


def test_erased_tokens_move_to_the_guide(tiny_pipe):
    """prepare solves the closed form on the aligned tokens of both concepts, every layer; the
    edit moves them to W c_guide as far as least squares can (more tokens than dimensions)."""
    _, artifact = prepare(tiny_pipe, {"concept": "red,star", "preserve_scale": 0.0,
                                      "ridge": 1e-9, "guide": "green"})
    keys, guide_keys = concept_keys(tiny_pipe, ["red", "star"], ["green", "green"], "cpu")
    n_red = len(aligned_rows(*token_counts(tiny_pipe, ["red", "green"]), 77)[0])
    assert keys.shape == guide_keys.shape and keys.shape[1] > n_red > 50  # both concepts
    none = torch.zeros(32, 0, dtype=torch.float64)
    for name, w in artifact.items():
        original = tiny_pipe.unet.get_parameter(name).double()
        want = uce_closed_form(original, keys, original @ guide_keys, none, 1.0, 0.0, 1e-9)
        torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-6)  # stored as float32
        before = (original @ keys - original @ guide_keys).norm()
        assert (w.double() @ keys - original @ guide_keys).norm() < 0.5 * before


def test_preserved_concepts_keep_their_projection(tiny_pipe):
    """A heavy preserve weight keeps W c_j: its drift is < 1% of the drift without it."""
    _, kept_art = prepare(tiny_pipe, {"concept": "red", "preserve": "blue",
                                      "preserve_scale": 1e4, "ridge": 1e-3})
    _, free_art = prepare(tiny_pipe, {"concept": "red", "preserve_scale": 0.0, "ridge": 1e-3})
    kept = preserve_keys(tiny_pipe, ["blue"], 32, "cpu")
    for name, w in kept_art.items():
        original = tiny_pipe.unet.get_parameter(name).double()
        drift = ((w.double() - original) @ kept).norm()
        free_drift = ((free_art[name].double() - original) @ kept).norm()
        assert drift < 0.01 * free_drift


def test_edits_only_cross_attention_keys_and_values(tiny_pipe):
    _, artifact = prepare(tiny_pipe, {"concept": "red"})
    layers = cross_attention_layers(tiny_pipe.unet)
    assert layers and all(name.endswith("attn2") for name, _ in layers)
    expected = {f"{n}.{p}.weight" for n, _ in layers for p in ("to_k", "to_v")}
    assert set(artifact) == expected
    original = dict(tiny_pipe.unet.named_parameters())
    assert all(not torch.equal(v, original[k]) for k, v in artifact.items())
    assert all(E.cross_attention_kv(k) for k in artifact)


def test_no_concept_returns_the_original_weights(tiny_pipe):
    _, artifact = prepare(tiny_pipe, {"concept": " "})
    original = dict(tiny_pipe.unet.named_parameters())
    assert artifact and all(torch.equal(v, original[k]) for k, v in artifact.items())


def test_template_expands_concepts_and_guides(tiny_pipe):
    lines: list[str] = []
    prepare(tiny_pipe, {"concept": "red,blue", "guide": "x,y", "template": "a {},{}"},
            lines.append)
    assert "'a red', 'red', 'a blue', 'blue' towards 'x', 'x', 'y', 'y'" in lines[0]

"""Adherence: world captions parsed, the judge's reading scored on real world images (own
captions high, mismatched low), held-out combinations, the metric and its contract."""

import numpy as np
import pytest

from harness.errors import DiffbenchError
from harness.metric import METRICS, Observation
from harness.mini import adherence as pure
from harness.mini import world
from metrics import adherence as ad
from tests.metrics.contract import MetricContract, cell_context, one_line_error


@pytest.fixture(scope="module")
def real():
    """400 real images of every combination, their captions and the judge's reading."""
    batch = world.sample(400, seed=21, split="all")
    return batch, ad.world_judge()(batch.images.numpy())


def derangement(texts, seed=0):
    """The captions moved to other images: each image gets one drawn for another image."""
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[j] for j in np.roll(order, 1)[np.argsort(order)]]


def test_parse_caption_round_trips_every_world_caption():
    captions = world.all_captions("all")
    assert len(captions) == 560
    for s, c, z, b in world.combinations("all"):
        combo = (world.SHAPES[s], world.COLOURS[c], world.SIZES[z], world.BACKGROUNDS[b])
        parsed = pure.parse_caption(world.caption(*combo))
        assert parsed == combo and world.caption(*parsed) == world.caption(*combo)
    assert pure.parse_caption("  A small green star on an  ORANGE background ") == (
        "star", "green", "small", "orange")


@pytest.mark.parametrize("text", [
    "", "a photo of a cat", "a small green star", "a small green star on an orange",
    "a small green star on a orange background",  # wrong article
    "a tiny green star on a red background", "a small teal star on a red background",
    "a small green hexagon on a red background", "a small green star on a pink background",
    "a small red star on a red background",  # the world never paints a shape on its colour
    "the small green star on a red background", "a small green star in a red background",
    "a small green star on a red backdrop", "a green small star on a red background",
])
def test_parse_caption_is_none_for_other_text(text):
    assert pure.parse_caption(text) is None


def test_real_images_with_their_own_captions_adhere(real):
    batch, pred = real
    shares = pure.adherence_shares(pure.adherence_flags(pred, batch.captions))
    assert shares["adherence"] > 0.8, shares
    assert min(shares[f"adherence_{a}"] for a in pure.REQUIRED) > 0.9, shares
    assert set(shares) == {"adherence", "adherence_colour", "adherence_shape",
                           "adherence_size", "adherence_heldout"}


def test_real_images_with_mismatched_captions_do_not(real):
    batch, pred = real
    shares = pure.adherence_shares(pure.adherence_flags(pred, derangement(batch.captions)))
    assert shares["adherence"] < 0.1, shares
    assert shares["adherence_colour"] < 0.3 and shares["adherence_shape"] < 0.4, shares


def test_flags_follow_the_judge_and_the_prompt():
    """Rows compare value names: a wrong colour reading clears only the colour flag."""
    pred = {"shape": [0, 0], "colour": [0, 1], "size": [1, 1], "background": [2, 2]}
    prompts = [world.caption("circle", "red", "large", "blue"), "not a caption"]
    assert pure.adherence_flags(pred, prompts) == [[1.0, 1.0, 1.0, 1.0, 0.0], None]
    pred["colour"] = [1, 1]
    assert pure.adherence_flags(pred, prompts)[0] == [0.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="2 judged images but 3 prompts"):
        pure.adherence_flags(pred, [*prompts, "x"])


def test_heldout_column_counts_only_heldout_combinations():
    seen, held = world.sample(120, 5, "train"), world.sample(40, 6, "heldout")
    judge = ad.world_judge()
    rows_seen = pure.adherence_flags(judge(seen.images.numpy()), seen.captions)
    rows_held = pure.adherence_flags(judge(held.images.numpy()), held.captions)
    assert pure.adherence_values(rows_seen)["adherence_heldout"] == []
    assert pure.adherence_shares(rows_seen)["adherence_heldout"] is None
    assert [r[-1] for r in rows_held] == [1.0] * 40
    mixed = pure.adherence_values(rows_seen + rows_held)
    assert mixed["adherence_heldout"] == pure.adherence_values(rows_held)["adherence"]
    held_shares = pure.adherence_shares(rows_held)
    assert held_shares["adherence_heldout"] == held_shares["adherence"] > 0.6, held_shares


def test_values_require_the_chosen_attributes():
    rows = [[1.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0]]
    assert pure.adherence_shares(rows) == {
        "adherence": 1 / 3, "adherence_colour": 1.0, "adherence_shape": 2 / 3,
        "adherence_size": 2 / 3, "adherence_heldout": 0.0}
    assert pure.adherence_values(rows, ("colour", "background")) == {
        "adherence": [0.0, 1.0, 1.0], "adherence_colour": [1.0, 1.0, 1.0],
        "adherence_background": [0.0, 1.0, 1.0], "adherence_heldout": [1.0]}
    assert pure.adherence_shares([]) == {"adherence": None, "adherence_colour": None,
                                       "adherence_shape": None, "adherence_size": None,
                                       "adherence_heldout": None}


def test_metric_columns_on_real_images_and_a_note_for_other_prompts(real):
    batch, _ = real
    m = ad.Adherence.for_cell(cell_context(embedded=True))
    texts = [*batch.captions[:-2], "a photo of a cat", "a small red circle"]
    m.update(Observation(n_images=200, images=batch.images[:200], prompts=texts[:200]))
    m.update(Observation(n_images=200, images=batch.images[200:], prompts=texts[200:]))
    out = m.compute()
    direct = pure.adherence_shares(pure.adherence_flags(real[1], batch.captions)[:-2])
    for col, value in direct.items():
        assert out[col] == pytest.approx(value), col
        assert out[f"{col}_ci_lo"] <= out[col] <= out[f"{col}_ci_hi"]
    assert out["adherence_n"] == 398 and out["adherence_warning"] == ""
    assert out["adherence_note"] == ("2 of 400 prompts are not world captions, not scored "
                                     "(e.g. 'a photo of a cat')")
    held = int(sum(world.is_heldout(*c[:2]) for c in map(pure.parse_caption, texts) if c))
    assert out["adherence_heldout_warning"] == f"n={held} < 100: wide interval"


def test_metric_without_world_prompts_or_off_the_embedded_model():
    m = ad.Adherence.for_cell(cell_context(embedded=True))
    m.update(Observation(n_images=2, images=np.zeros((2, 32, 32, 3), np.uint8),
                         prompts=["a cat", "a dog"]))
    out = m.compute()
    assert out["adherence"] is None and out["adherence_heldout"] is None
    assert out["adherence_n"] == 0 and out["adherence_note"].startswith("2 of 2 prompts")
    other = ad.Adherence.for_cell(cell_context())
    other.update(Observation(n_images=2, images=np.zeros((2, 32, 32, 3), np.uint8),
                             prompts=[world.caption("circle", "red", "large", "blue")] * 2))
    assert other.compute() == {} and other.judge is None
    toy = cell_context(embedded=True)
    toy.spec.has_quality = False
    assert ad.Adherence.for_cell(toy).compute() == {}
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        m.update(Observation(n_images=2, images=np.zeros((2, 32, 32, 3), np.uint8),
                             prompts=["a cat"]))


def test_attributes_option():
    ctx = cell_context({"adherence": {"attributes": ["colour", "shape"]}}, embedded=True)
    m = ad.Adherence.for_cell(ctx)
    assert m.attributes == ("colour", "shape") and "adherence_size" not in m.compute()
    for bad in (["colour", "hue"], []):
        with one_line_error(r"^\[metric_options\.adherence\] attributes = .*: choose one or "
                            r"more of colour, shape, size, background$"):
            ad.Adherence.for_cell(cell_context({"adherence": {"attributes": bad}},
                                               embedded=True))
    with pytest.raises(DiffbenchError):
        ad.check_attributes("hue")
    assert ad.check_attributes("size") == ("size",)


def test_listed_by_diffbench_list_metrics(capsys):
    from harness.cli import main

    assert main(["list", "metrics"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("adherence")]
    assert lines and "colour, shape and size" in lines[0]
    assert METRICS.get("adherence") is ad.Adherence


class TestAdherenceContract(MetricContract):
    metric_name = "adherence"
    embedded = True

    def make_metric(self):
        return ad.Adherence(ad.world_judge())

    def observations(self):
        a, b = world.sample(6, 31, "all"), world.sample(5, 32, "heldout")
        return [Observation(n_images=6, images=a.images, prompts=a.captions),
                Observation(n_images=1, flops=10),
                Observation(n_images=2, images=b.images[:2], prompts=["a cat", b.captions[1]]),
                Observation(n_images=3, images=b.images[2:], prompts=b.captions[2:])]

    def option_values(self, tmp_path):
        return {"attributes": ["colour", "shape", "size"]}

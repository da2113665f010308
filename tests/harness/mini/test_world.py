"""The procedural shape world: determinism, splits, captions agree with attributes and pixels."""

import pytest
import torch

from harness.mini import prompts as world_prompts
from harness.mini import world


def test_same_seed_same_batch_and_different_seed_differs():
    a, b = world.sample(64, 3, "all"), world.sample(64, 3, "all")
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    c = world.sample(64, 4, "all")
    assert not torch.equal(a.images, c.images)


def test_images_are_uint8_nhwc_and_float_view_is_nchw():
    batch = world.sample(8, 0)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (8, 32, 32, 3)
    x = batch.float_images()
    assert x.shape == (8, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert len(batch) == 8


def test_captions_agree_with_attribute_indices():
    batch = world.sample(500, 1, "all")
    for i, text in enumerate(batch.captions):
        words = text.split()
        assert words[1] == world.SIZES[batch.size[i]]
        assert words[2] == world.COLOURS[batch.colour[i]]
        assert words[3] == world.SHAPES[batch.shape[i]]
        assert words[-2] == world.BACKGROUNDS[batch.background[i]]
        assert words[5] == ("an" if words[-2][0] in "aeiou" else "a")
    assert bool((batch.background != batch.colour).all())


def test_caption_wording():
    assert world.caption("star", "green", "small", "orange") == \
        "a small green star on an orange background"
    assert world.caption("circle", "red", "large", "blue") == \
        "a large red circle on a blue background"
    assert world_prompts.caption is world.caption and world_prompts.SHAPES is world.SHAPES


def test_vocabulary_is_big_enough():
    assert {"circle", "square", "triangle", "cross", "star"} <= set(world.SHAPES)
    assert len(world.COLOURS) >= 8 and set(world.SIZES) == {"small", "large"}
    assert len(world.all_captions("all")) == 5 * 8 * 2 * 7
    assert all(len(world.RGB[c]) == 3 for c in world.COLOURS)


def test_heldout_combinations_never_in_train():
    train = world.sample(5000, 2, "train")
    pairs = {(world.SHAPES[s], world.COLOURS[c])
             for s, c in zip(train.shape.tolist(), train.colour.tolist(), strict=True)}
    assert not pairs & set(world.HELDOUT)
    assert len(pairs) == 5 * 8 - len(world.HELDOUT)  # every other pair appears
    held = world.sample(500, 2, "heldout")
    held_pairs = {(world.SHAPES[s], world.COLOURS[c])
                  for s, c in zip(held.shape.tolist(), held.colour.tolist(), strict=True)}
    assert held_pairs == {("triangle", "purple"), ("cross", "yellow")}
    assert not any("purple triangle" in c or "yellow cross" in c
                   for c in world.all_captions("train"))
    assert set(world.all_captions("heldout")) | set(world.all_captions("train")) == \
        set(world.all_captions("all"))


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown split"):
        world.sample(4, 0, "test")


def test_pixels_show_the_shape_colour_and_background():
    batch = world.sample(300, 5, "all")
    palette = torch.tensor([world.RGB[c] for c in world.COLOURS], dtype=torch.float32)
    img = batch.images.float()
    # The corner pixel is background for every shape (1 px margin, corners outside all shapes).
    corner = img[:, 0, 0]
    assert bool(((corner - palette[batch.background]).abs() <= world.COLOUR_JITTER + 1).all())
    # The most common non-background colour is the shape's: pixels near the shape colour exist.
    fg = palette[batch.colour].view(-1, 1, 1, 3)
    near = ((img - fg).abs() <= world.COLOUR_JITTER + 1).all(-1).flatten(1).sum(1)
    assert bool((near >= 20).all())
    # Large shapes cover more pixels than small ones.
    large = near[batch.size == world.SIZES.index("large")].float().mean()
    small = near[batch.size == world.SIZES.index("small")].float().mean()
    assert large > 2.5 * small


def test_shapes_are_distinguishable_by_area():
    """Same radius and place, different masks: each shape has its own pixel coverage."""
    n = len(world.SHAPES)
    shape = torch.arange(n)
    colour = torch.zeros(n, dtype=torch.long)
    background = torch.ones(n, dtype=torch.long)
    size = torch.ones(n, dtype=torch.long)
    images = world.render(shape, colour, size, background, torch.Generator().manual_seed(0))
    coverage = (images.float() - images[:, :1, :1].float()).abs().sum(-1).gt(60).sum((1, 2))
    assert len(set(coverage.tolist())) == n


def test_sampling_is_vectorised(monkeypatch):
    """Each shape's mask is computed once per batch, whatever the batch size (no per-image loop)."""
    calls = []
    for name, fn in list(world.SHAPE_MASKS.items()):
        def counted(u, v, fn=fn, name=name):
            calls.append((name, len(u)))
            return fn(u, v)
        monkeypatch.setitem(world.SHAPE_MASKS, name, counted)
    batch = world.sample(3000, 0, "train")
    assert len(batch) == 3000 and batch.images.shape == (3000, 32, 32, 3)
    assert sorted(name for name, _ in calls) == sorted(world.SHAPES)
    assert sum(n for _, n in calls) == 3000

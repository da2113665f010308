"""Each attack on the embedded mini-sd with small budgets: seeded, never writes the concept,
its objective moves the right way within the budget, and what it installs comes off exactly."""

from __future__ import annotations

import pytest
import torch

from attacks import _common as C
from harness.attack import ATTACKS, AttackResult, AttackTarget, rewrite, spells
from harness.errors import DiffbenchError
from harness.mini.prompts import shapes_red

RED = tuple(shapes_red()[:8])


@pytest.fixture(scope="module")
def pipe():
    from harness.models import MODELS, load_pipeline, weights_source

    spec = MODELS.get("mini-sd")
    return load_pipeline(spec, weights_source(spec, "default"), torch.float32, "cpu")


@pytest.fixture(scope="module")
def target(pipe):
    from metrics.concept import WorldAttributeDetector

    judge = WorldAttributeDetector("red")

    def make(texts, seeds, steps):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.inference_mode():
            out = pipe(list(texts), num_inference_steps=steps, guidance_scale=5.0,
                       generator=gens, output_type="np").images
        return torch.from_numpy((out * 255).round().astype("uint8"))

    return AttackTarget(concept="red", prompts=RED, seed=0, device="cpu", generate=make,
                        original=make, concept_prob=lambda im: judge.probs(im.numpy()),
                        log=lambda m: None)


def search(pipe, target, name, **params):
    spec = ATTACKS.get(name)
    return spec.search(pipe, spec.config({"concept": "red", **params}), target)


def test_registry_lists_the_four_attacks():
    assert {"synonyms", "ringabell", "prompt_search", "embedding"} <= set(ATTACKS.names())


def test_rewrite_replaces_the_word_and_spells_sees_through_spaces():
    result = AttackResult(text="crimson")
    assert rewrite(["a large red circle", "a blue star"], "red", result) == [
        "a large crimson circle", "crimson a blue star"]
    assert spells("r ed", "red") and spells("R-E-D", "red") and not spells("rose", "red")
    assert rewrite(["x", "y", "z"], "red", AttackResult(prompts=("p", "q"))) == ["p", "q", "p"]


def test_whole_words_exclude_the_concept(pipe):
    words = C.whole_words(pipe.tokenizer, "red")
    assert "red" not in words and "circle" in words and "blue" in words
    assert all(len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in words)


def test_synonyms_rewrite_every_prompt_without_the_word(pipe, target):
    result = search(pipe, target, "synonyms")
    assert len(result.prompts) == len(RED)
    assert not any(spells(p, "red") for p in result.prompts)
    assert result.prompts[0].startswith("a ") and result.prompts[0].split()[2] == "crimson"
    with pytest.raises(DiffbenchError, match="no built-in substitutes"):
        ATTACKS.get("synonyms").config({"concept": "tiger"})
    with pytest.raises(DiffbenchError, match="writes the concept"):
        ATTACKS.get("synonyms").config({"concept": "red", "words": "dark red"})


def test_ringabell_is_seeded_elitist_and_never_writes_the_concept(pipe, target):
    a = search(pipe, target, "ringabell", population=16, generations=6, n_prompts=4)
    b = search(pipe, target, "ringabell", population=16, generations=6, n_prompts=4)
    assert a.text == b.text and not spells(a.text, "red") and len(a.text.split()) == 3
    history = a.tensors["history"]
    assert (history[1:] <= history[:-1] + 1e-12).all()  # the elite is kept: never worse


def test_ringabell_concept_vector_points_to_the_concept(pipe):
    prompts = list(RED[:4])
    c = __import__("attacks.ringabell", fromlist=["x"]).concept_vector(
        pipe, prompts, "red", ("green", "blue"))
    e_red = C.encode(pipe, prompts).double().mean(0)
    e_green = C.encode(pipe, C.substitute(prompts, "red", "green")).double().mean(0)
    e_blue = C.encode(pipe, C.substitute(prompts, "red", "blue")).double().mean(0)
    assert torch.allclose(c, e_red - (e_green + e_blue) / 2, atol=1e-9)


def test_prompt_search_keeps_to_its_budget_and_never_gets_worse(pipe, target):
    result = search(pipe, target, "prompt_search", queries=9, candidates=4, n_prompts=2,
                    steps=2)
    assert result.info["queries"] <= 9 and not spells(result.text, "red")
    history = result.tensors["history"]
    assert (history[1:] >= history[:-1]).all()
    again = search(pipe, target, "prompt_search", queries=9, candidates=4, n_prompts=2, steps=2)
    assert again.text == result.text


def test_embedding_learns_a_vector_and_its_hook_comes_off_exactly(pipe, target):
    params = dict(steps=3, n_images=2, batch_size=2, image_steps=2)
    result = search(pipe, target, "embedding", **params)
    assert result.text == "q" and result.tensors["embedding"].ndim == 1
    assert all(p.grad is None for p in pipe.unet.parameters())  # the pipeline learned nothing
    texts = ["a large q circle on a blue background"]
    before = C.encode(pipe, texts)
    spec = ATTACKS.get("embedding")
    handle = spec.apply(pipe, spec.config({"concept": "red", **params}), result)
    table = pipe.text_encoder.get_input_embeddings()
    ids = pipe.tokenizer(texts, return_tensors="pt").input_ids
    row = table(ids)[0, ids[0].tolist().index(pipe.tokenizer.convert_tokens_to_ids("q</w>"))]
    assert torch.equal(row, result.tensors["embedding"])
    assert not torch.equal(C.encode(pipe, texts), before)
    handle.remove()
    assert torch.equal(C.encode(pipe, texts), before)


def test_a_prompt_without_the_concept_gets_the_fragment_in_front(pipe, target):
    import dataclasses

    blue = dataclasses.replace(target, prompts=("a large blue circle on a red background",
                                                "a small blue star on a green background"))
    result = search(pipe, blue, "ringabell", population=4, generations=1, n_prompts=2)
    assert result.text  # red is named (as a background): the slot is there
    none = dataclasses.replace(target, prompts=("a large blue circle on a green background",))
    assert C.concept_prompts(none, 4) == ["red a large blue circle on a green background"]
    front = search(pipe, none, "ringabell", population=4, generations=1)
    assert rewrite(list(none.prompts), "red", front)[0].endswith(none.prompts[0])

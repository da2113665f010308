import types

import pytest
import torch

from harness.errors import DiffbenchError
from harness.method import METHODS
from harness.steps import StepContext
from methods.tome import bipartite_matching, grid_downsample, split_windows
from tests.methods.contract import PROMPTS, MethodContract, one_line_error, run
from tests.methods.dit_fixtures import on_model


def tokens_seen(pipe, spec, params, probes: dict) -> dict:
    """Token count each probe module receives (args[0].shape[1]), by key, in one generation
    with ToMe applied."""
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, key=key: seen.setdefault(key, set()).add(args[0].shape[1]))
        for key, m in probes.items()]
    method, ctx = METHODS.get("tome"), StepContext()
    try:
        with method.apply(pipe, method.config(params), ctx) as handle:
            run(pipe, spec, handle, PROMPTS[:1], ctx=ctx, steps=2)
    finally:
        for h in hooks:
            h.remove()
    return seen


def attn1_tokens(pipe, spec, params):
    """Token count each UNet attn1 sees, by block name."""
    return tokens_seen(pipe, spec, params, {n: m.attn1 for n, m in pipe.unet.named_modules()
                                            if hasattr(m, "attn1")})


class TestToMe(MethodContract):
    method = "tome"
    identity_params = {"ratio": 0.0}
    active_params = {"ratio": 0.5}

    def test_attention_sees_n_minus_r_tokens(self, tiny_pipe, tiny_spec):
        base = attn1_tokens(tiny_pipe, tiny_spec, {"ratio": 0.0})
        merged = attn1_tokens(tiny_pipe, tiny_spec, {"ratio": 0.5})
        full = {n: next(iter(v)) for n, v in base.items()}
        assert full["mid_block.attentions.0.transformer_blocks.0"] * 4 == \
            full["down_blocks.0.attentions.0.transformer_blocks.0"]
        for name, tokens in merged.items():
            n = full[name]
            expected = n - int(n * 0.5) if not name.startswith("mid_block") else n
            assert tokens == {expected}, name  # mid block is downsampled 2x: not merged

    def test_max_downsample_two_also_merges_mid_block(self, tiny_pipe, tiny_spec):
        merged = attn1_tokens(tiny_pipe, tiny_spec, {"ratio": 0.5, "max_downsample": 2})
        assert merged["mid_block.attentions.0.transformer_blocks.0"] == {32}

    def test_ratio_is_capped_at_the_source_tokens(self, tiny_pipe, tiny_spec):
        merged = attn1_tokens(tiny_pipe, tiny_spec, {"ratio": 0.9})
        assert merged["down_blocks.0.attentions.0.transformer_blocks.0"] == {256 // 4}

    def test_seed_changes_the_destination_choice(self, tiny_pipe, tiny_spec):
        method, out = METHODS.get("tome"), []
        for seed in (0, 0, 1):
            ctx = StepContext()
            with method.apply(tiny_pipe, method.config({"ratio": 0.5, "seed": seed}), ctx) as h:
                out.append(run(tiny_pipe, tiny_spec, h, PROMPTS[:1], ctx=ctx, steps=3))
        assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])

    def test_unsupported_block_is_one_line_error(self, tiny_pipe, monkeypatch):
        block = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
        monkeypatch.setattr(block, "norm_type", "ada_norm_zero")
        with pytest.raises(DiffbenchError, match="ada_norm_zero") as err:
            self.apply(tiny_pipe, {"ratio": 0.5})
        assert "\n" not in str(err.value)

    def test_pipeline_without_a_denoiser_is_refused(self):
        with pytest.raises(DiffbenchError, match="needs a transformer .* or a UNet"):
            self.apply(types.SimpleNamespace(transformer=object()), {"ratio": 0.5})

    def test_ratio_out_of_range_names_field(self):
        with pytest.raises(DiffbenchError, match=r"tome.ratio=0.95 is out of range"):
            METHODS.get("tome").config({"ratio": 0.95})


def test_one_destination_per_window():
    dst, src = split_windows(6, 8, 2, 2, torch.Generator().manual_seed(3))
    assert dst.numel() == 12 and src.numel() == 36
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(48))
    windows = [(int(p) // 8 // 2, int(p) % 8 // 2) for p in dst]
    assert len(set(windows)) == 12


def test_fixed_destination_is_top_left():
    dst, _ = split_windows(4, 4, 2, 2, None, use_rand=False)
    assert dst.tolist() == [0, 2, 8, 10]


def test_leftover_rows_and_columns_are_sources():
    dst, src = split_windows(5, 5, 2, 2, None, use_rand=False)
    assert dst.numel() == 4 and all(int(p) // 5 < 4 and int(p) % 5 < 4 for p in dst)


def test_merge_reduces_by_r_and_unmerge_restores():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16)
    plan = bipartite_matching(x, 8, 8, r=20, generator=torch.Generator().manual_seed(1))
    merged = plan.merge(x)
    assert merged.shape == (2, 44, 16)
    back = plan.unmerge(merged)
    assert back.shape == x.shape
    for b in range(2):
        moved = plan.src_pos[plan.moved[b]]
        targets = plan.dst_pos[plan.target[b]]
        hit = set(targets.tolist())
        untouched = [p for p in range(64) if p not in set(moved.tolist()) and p not in hit]
        assert torch.equal(back[b, untouched], x[b, untouched])
        for m, t in zip(moved.tolist(), targets.tolist()):
            assert torch.equal(back[b, m], back[b, t])  # merged token copies its destination
        t = targets[0].item()
        group = [t] + [m for m, tt in zip(moved.tolist(), targets.tolist()) if tt == t]
        assert torch.allclose(back[b, t], x[b, group].mean(0), atol=1e-6)


def test_merge_picks_most_similar_pairs():
    x = torch.randn(1, 16, 8)
    plan = bipartite_matching(x, 4, 4, r=1, use_rand=False)
    dst = x[0, plan.dst_pos]
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    sim = unit(x[0, plan.src_pos]) @ unit(dst).T
    best = sim.max(dim=-1).values
    assert plan.moved[0, 0] == best.argmax()
    assert plan.target[0, 0] == sim[best.argmax()].argmax()


def test_zero_merges_is_a_lossless_permutation():
    x = torch.randn(1, 16, 4)
    plan = bipartite_matching(x, 4, 4, r=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plan.unmerge(plan.merge(x)), x)


def test_grid_downsample():
    assert grid_downsample(256, 16, 16) == 1
    assert grid_downsample(64, 16, 16) == 2
    assert grid_downsample(9, 9, 9) == 4  # ceil(9 / 4) = 3
    assert grid_downsample(77, 16, 16) is None


def test_wrapper_matches_block_forward_when_nothing_merges(tiny_pipe):
    """With r = 0 (a pure token permutation) the wrapped block equals diffusers' forward."""
    from methods.tome import ToMeConfig, tome_forward

    block = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    merger = types.SimpleNamespace(plan=lambda x: bipartite_matching(
        x, 16, 16, 0, generator=torch.Generator().manual_seed(0)))
    config = ToMeConfig(merge_attn=True, merge_crossattn=True, merge_mlp=True)
    x, text = torch.randn(2, 256, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = block(x, encoder_hidden_states=text)
        got = tome_forward(block, block.forward, merger, config)(x, encoder_hidden_states=text)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.equal(x, expected)


def part_tokens(pipe, spec, params, part):
    """Token count the named component of every transformer block computes on, by block index
    (seen by its first layer: the component's own hooks see its unmerged input)."""
    first = {"ff": "net.0"}.get(part, "to_q")
    return tokens_seen(pipe, spec, params, {
        i: getattr(b, part).get_submodule(first)
        for i, b in enumerate(pipe.transformer.transformer_blocks)})


class TransformerToMe(MethodContract):
    """ToMe on a transformer's blocks: image tokens merged around attention (and MLP)."""

    method = "tome"
    identity_params = {"ratio": 0.0}
    active_params = {"ratio": 0.5}
    attention = "attn"  # the merged self-attention of each block

    def test_attention_and_mlp_see_n_minus_r_image_tokens(self, tiny_pipe, tiny_spec):
        full = part_tokens(tiny_pipe, tiny_spec, {"ratio": 0.0}, self.attention)
        n = next(iter(full[0]))
        merged = part_tokens(tiny_pipe, tiny_spec, {"ratio": 0.5}, self.attention)
        assert set(merged) == set(full) and all(v == {n - n // 2} for v in merged.values())
        mlp = part_tokens(tiny_pipe, tiny_spec, {"ratio": 0.5, "merge_mlp": True}, "ff")
        assert all(v == {n - n // 2} for v in mlp.values())
        assert part_tokens(tiny_pipe, tiny_spec, {"ratio": 0.5}, "ff") == {
            i: {n} for i in full}  # merge_mlp off: the MLP sees every token


class TestToMeOnMiniSD3(on_model(TransformerToMe, "sd3")):
    pass


class TestToMeOnTinySD3(on_model(TransformerToMe, "tiny_sd3")):
    pass


class TestToMeOnDiT(on_model(TransformerToMe, "dit")):
    attention = "attn1"  # BasicTransformerBlock's self-attention


class TestToMeOnPixArt(on_model(TransformerToMe, "pixart")):
    attention = "attn1"


def test_flux_is_refused_with_its_reason(flux_pipe):
    with one_line_error(r"^tome does not merge tokens in FluxTransformer2DModel's "
                        r"FluxTransformerBlock \(rotary position embeddings"):
        METHODS.get("tome").apply(flux_pipe, METHODS.get("tome").config({}), StepContext())

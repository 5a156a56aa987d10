"""TokenPacker (arXiv 2407.02392): shapes and counts at 7B and tiny sizes, an independent per-region reference, the
region restriction, gradients, the original's init, config errors, FLOPs, save / load and generation.

The reference transcribes CircleRadon/TokenPacker ``llava/model/multimodal_projector/builder.py`` per image, region
and head in float64 with Python loops: bilinear sampling written out (``align_corners=False``: source
``(i + 0.5) s - 0.5``), the attention of one query over the ``s*s`` keys of its region, no residual, then the MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_stf.flops import count_flops
from llava_stf.generation import GenerationSettings, Generator, Request
from llava_stf.model import build_projector
from llava_stf.model.presets import build_meta_model, load_preset, parameter_counts
from llava_stf.model.projectors import ProjectorConfigError
from llava_stf.model.projectors.tokenpacker import RegionAttention, TokenPackerProjector
from llava_stf.testing import make_image, save_tiny_checkpoint, tiny_config, tiny_model

C, D = 32, 64  # tiny vision / text widths
PRESETS = [("tokenpacker-7b", 2, 144), ("tokenpacker-64token-7b", 3, 64), ("tokenpacker-36token-7b", 4, 36)]
TINY = [(8, 1), (8, 2), (8, 4), (6, 2), (6, 3)]  # (grid, scale); a 6 x 6 grid is a 24 px image with patch 4


def tiny(tokenizer, scale=2, grid=8, **kwargs):
    size = {"image_size": 4 * grid}
    config = tiny_config(tokenizer, "tokenpacker", {"scale": scale, **kwargs}, vision_overrides=size)
    return config, build_projector(config)


def features(config, batch=2, dtype=torch.float64, seed=0):
    gh, gw = config.grid_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, gh * gw, config.projector_shapes().in_channels, generator=generator, dtype=dtype)


def randomize(projector: TokenPackerProjector) -> TokenPackerProjector:
    """float64 weights of unit-scale outputs, non-zero biases and non-unit norms (the init zeroes the biases)."""
    projector = projector.double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in projector.parameters():
            fan_in = param.shape[-1] if param.dim() == 2 else 4
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) / math.sqrt(fan_in))
    return projector


# ------------------------------------------------------------------------------------------- the reference
def bilinear(grid: torch.Tensor, s: int) -> torch.Tensor:
    """``[H, W, C] -> [H/s, W/s, C]``: each output pixel from the four source pixels around ``(i + 0.5) s - 0.5``."""
    h, w, _ = grid.shape

    def taps(i, size):
        x = max((i + 0.5) * s - 0.5, 0.0)
        lo = math.floor(x)
        return [(lo, 1 - (x - lo)), (min(lo + 1, size - 1), x - lo)]

    rows = [[sum(a * b * grid[y, x] for y, a in taps(i, h) for x, b in taps(j, w)) for j in range(w // s)]
            for i in range(h // s)]  # fmt: skip
    return torch.stack([torch.stack(r) for r in rows])


def reference(p: TokenPackerProjector, x: torch.Tensor) -> torch.Tensor:
    """``[B, H*W, L*C] -> [B, (H/s)*(W/s), D]``, one image, region and head at a time."""
    s, gh, gw, heads = p.params.scale, p.shapes.grid_h, p.shapes.grid_w, p.params.heads
    e = p.params.embed_dim
    d = e // heads

    def mlp(seq, v):
        return F.linear(F.gelu(F.linear(v, seq[0].weight, seq[0].bias)), seq[2].weight, seq[2].bias)

    def norm(ln, v):
        return F.layer_norm(v, (e,), ln.weight, ln.bias, p.params.norm_eps)

    wq, wk, wv = p.attn.in_proj_weight.chunk(3)
    bq, bk, bv = p.attn.in_proj_bias.chunk(3)
    out = []
    for image in x:
        coarse = bilinear(image[:, -C:].reshape(gh, gw, C), s)  # [H/s, W/s, C]
        keys, values = norm(p.key_norm, mlp(p.key_mlp, image)), norm(p.value_norm, mlp(p.value_mlp, image))
        tokens = []
        for i in range(gh // s):
            for j in range(gw // s):
                q = F.linear(norm(p.query_norm, p.query_proj.weight @ coarse[i, j]), wq, bq)
                region = [(s * i + dy) * gw + s * j + dx for dy in range(s) for dx in range(s)]
                k, v = F.linear(keys[region], wk, bk), F.linear(values[region], wv, bv)
                head_out = []
                for h in range(heads):
                    cut = slice(h * d, (h + 1) * d)
                    weights = torch.softmax(k[:, cut] @ q[cut] / math.sqrt(d), dim=0)
                    head_out.append(weights @ v[:, cut])
                tokens.append(p.attn.out_proj(torch.cat(head_out)))
        out.append(mlp(p.mlp, torch.stack(tokens)))
    return torch.stack(out)


def test_bilinear_reference_is_the_documented_sampling():
    grid = torch.arange(12.0 * 12).reshape(12, 12, 1).double()
    torch.testing.assert_close(bilinear(grid, 2)[1, 2, 0], grid[2:4, 4:6].mean())  # s=2: the 2x2 mean
    torch.testing.assert_close(bilinear(grid, 3)[1, 2, 0], grid[4, 7, 0])  # s=3: the centre pixel
    torch.testing.assert_close(bilinear(grid, 4)[1, 2, 0], grid[5:7, 9:11].mean())  # s=4: the central 2x2


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(("preset", "scale", "tokens"), PRESETS)
def test_7b_presets_on_meta(preset, scale, tokens):
    config = load_preset(preset)
    assert config.vision_feature_layer == [12, 16, 22, 23]  # the original's layers; 23 = hidden state -2
    assert config.projector_kwargs == {"scale": scale, "num_levels": 4, "embed_dim": 1024, "heads": 8, "norm_eps": 1e-6}
    model = build_meta_model(config)
    assert config.num_image_tokens == tokens and parameter_counts(model)["projector"] == 36_722_688
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        out = projector(torch.empty(2, 576, 4096, device="meta"))
    assert out.shape == (2, tokens, 4096)
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    # CircleRadon/TokenPacker names: q_proj_1, ln_q_1, k_proj_1, ln_k_1, v_proj_1, ln_v_1, clip_attn, mlp
    assert shapes == {
        "query_proj.weight": (1024, 1024),
        **{f"{n}.{w}": (1024,) for n in ("query_norm", "key_norm", "value_norm") for w in ("weight", "bias")},
        **{f"{n}.0.weight": (1024, 4096) for n in ("key_mlp", "value_mlp")},
        **{f"{n}.{i}.bias": (1024,) for n in ("key_mlp", "value_mlp") for i in (0, 2)},
        **{f"{n}.2.weight": (1024, 1024) for n in ("key_mlp", "value_mlp")},
        "attn.in_proj_weight": (3072, 1024),
        "attn.in_proj_bias": (3072,),
        "attn.out_proj.weight": (1024, 1024),
        "attn.out_proj.bias": (1024,),
        "mlp.0.weight": (4096, 1024),
        "mlp.0.bias": (4096,),
        "mlp.2.weight": (4096, 4096),
        "mlp.2.bias": (4096,),
    }


@pytest.mark.parametrize(("grid", "scale"), TINY)
def test_tiny_forward_equals_per_region_reference(tokenizer, grid, scale):
    config, projector = tiny(tokenizer, scale, grid)
    assert config.vision_feature_layer == [4, 6, 7, 8]  # the documented rule on the 9-block tiny tower
    assert config.num_image_tokens == (grid // scale) ** 2
    projector = randomize(projector)
    x = features(config)
    with torch.no_grad():
        actual, expected = projector(x), reference(projector, x)
    assert actual.shape == (2, (grid // scale) ** 2, D)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_region_attention_equals_torch_multihead_attention(tokenizer):
    """The parameter layout is ``nn.MultiheadAttention``'s (the original's ``clip_attn``): same weights, same output."""
    attn = RegionAttention(16, 4).double()
    nn.init.normal_(attn.in_proj_weight)
    nn.init.normal_(attn.in_proj_bias)
    mha = nn.MultiheadAttention(16, 4).double()
    mha.load_state_dict(attn.state_dict())
    q, kv = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(2, 3, 5, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        ours = attn(q, kv[0], kv[1])
        # the original's layout: sequence first, one query per (region, image) batch row
        k, v = (t.reshape(15, 9, 16).transpose(0, 1) for t in kv)
        theirs = mha(q.reshape(1, 15, 16), k, v)
    torch.testing.assert_close(ours, theirs[0].reshape(3, 5, 16), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("grid", "scale"), [(8, 2), (6, 3), (8, 4)])
def test_each_query_sees_only_its_region(tokenizer, grid, scale):
    config, projector = tiny(tokenizer, scale, grid)
    projector = randomize(projector)
    x = features(config, batch=1)
    with torch.no_grad():
        base = projector(x)
        for position in range(grid * grid):
            changed = x.clone()
            changed[0, position] += 3.0  # every level, the query level included
            out = projector(changed)[0]
            region = (position // grid // scale) * (grid // scale) + (position % grid) // scale
            delta = (out - base[0]).abs().amax(dim=-1)
            assert delta[region] > 1e-3, position
            assert delta[torch.arange(len(delta)) != region].max() < 1e-12, position


def test_gradients_reach_every_parameter(tokenizer):
    config, projector = tiny(tokenizer)
    x = features(config, dtype=torch.float32).requires_grad_(True)
    out = projector.train()(x)
    (out * torch.randn_like(out)).sum().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    # The key part of the in-projection bias shifts every score of a query equally: softmax ignores it.
    _, key_bias_grad, value_bias_grad = projector.attn.in_proj_bias.grad.chunk(3)
    assert key_bias_grad.abs().max() < 1e-5 < value_bias_grad.abs().max()


def test_init_follows_the_original(session_tokenizer):
    projector = tiny_model(tiny_config(session_tokenizer, "tokenpacker")).model.multi_modal_projector
    for name, module in projector.named_modules():
        if isinstance(module, nn.Linear):
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.2), name  # trunc_normal(std=0.02)
            assert module.bias is None or not module.bias.any(), name
        elif isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any(), name
    bound = math.sqrt(6 / (4 * C))  # xavier_uniform over [3E, E]
    weight = projector.attn.in_proj_weight
    assert weight.abs().max() <= bound and weight.std() > 0.8 * bound / math.sqrt(3)
    assert not projector.attn.in_proj_bias.any() and projector.query_proj.bias is None
    no_bias = tiny_model(tiny_config(session_tokenizer, "tokenpacker", multimodal_projector_bias=False))
    names = [n for n, _ in no_bias.model.multi_modal_projector.named_parameters()]
    assert not [n for n in names if n.endswith("bias") and "norm" not in n] and "attn.in_proj_weight" in names


# ------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scale": 3}, "projector_kwargs.scale=3 does not divide the 8x8"),
        ({"scale": 0}, "projector_kwargs.scale must be a positive integer"),
        ({"heads": 5}, "projector_kwargs.heads=5 does not divide projector_kwargs.embed_dim=32"),
        ({"num_levels": 2}, "projector_kwargs.num_levels=2 but vision_feature_layer lists 4"),
        ({"norm_eps": 0}, "projector_kwargs.norm_eps"),
        ({"window": 2}, "unknown field(s) ['window']"),
    ],
)
def test_bad_settings_name_the_field(session_tokenizer, kwargs, field):
    with pytest.raises(ProjectorConfigError) as info:
        tiny_config(session_tokenizer, "tokenpacker", kwargs)
    assert field in str(info.value)


def test_shallow_tower_needs_explicit_layers(session_tokenizer):
    with pytest.raises(ProjectorConfigError, match="vision_feature_layer"):
        tiny_config(session_tokenizer, "tokenpacker", vision_overrides={"num_hidden_layers": 6})
    shallow = {"num_hidden_layers": 6}
    config = tiny_config(session_tokenizer, "tokenpacker", vision_feature_layer=[2, -2], vision_overrides=shallow)
    assert config.projector_kwargs["num_levels"] == 2 and config.num_image_tokens == 16


# ---------------------------------------------------------------------------------------------------- FLOPs
def test_projector_flops_match_flop_counter_mode(session_tokenizer):
    for scale in (1, 2, 4):
        config = tiny_config(session_tokenizer, "tokenpacker", {"scale": scale})
        projector = tiny_model(config).model.multi_modal_projector
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            projector(features(config, batch=1, dtype=torch.float32))
        assert counter.get_total_flops() == count_flops(config).projector > 0


@pytest.mark.parametrize(("preset", "scale", "tokens"), PRESETS)
def test_7b_projector_flops_formula(preset, scale, tokens):
    """Per image, N = 576 keys, M queries, E = C = 1024, L C = 4096, D = 4096 (MACs; FLOPs = 2 x MACs)."""
    n, m, e, d = 576, tokens, 1024, 4096
    macs = m * e * e + 2 * n * (4 * e * e + e * e) + (2 * m + 2 * n) * e * e + 2 * n * e + m * (e * d + d * d)
    assert count_flops(load_preset(preset)).projector == 2 * macs
    assert 2 * macs / 1e9 == pytest.approx({2: 21.44, 3: 17.58, 4: 16.23}[scale], abs=0.01)


# ------------------------------------------------------------------------------------- checkpoint and generation
def test_checkpoint_round_trip_and_generation(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "ckpt", "tokenpacker", seed=3, scale=4)
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = tiny_model(tiny_config(projector_type="tokenpacker", projector_kwargs={"scale": 4}), seed=3)
    for key, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # loaded tensors are not re-initialised
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.projector_kwargs["scale"] == 4 and processor.num_image_tokens == 4
    generator = Generator(model.eval(), processor)
    requests = [Request.single("What is shown?", make_image(1)), Request.single("Describe it.", make_image(2))]
    settings = GenerationSettings(max_new_tokens=5)
    both = generator.generate(requests, settings)
    assert both == [generator.generate([r], settings)[0] for r in requests]
    inputs = generator.encode(requests)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

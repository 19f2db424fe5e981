"""Shared layers: closed-form embeddings, identity at initialisation, masks that hide what they mask."""
import math

import pytest
import torch
import torch.nn.functional as F

from cascade.nn import (CrossAttention, Downsample, ResBlock, SelfAttention, SelfAttention2d, TimestepEmbedding,
                        TransformerBlock, Upsample, timestep_embedding)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 37.5])
    emb = timestep_embedding(t, 8, max_period=10000.0)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = torch.tensor([[math.cos(tt * f) for f in freqs] + [math.sin(tt * f) for f in freqs] for tt in t.tolist()])
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7) and torch.all(timestep_embedding(t, 7)[:, -1] == 0)


def test_timestep_embedding_mlp_is_the_mlp_of_the_sinusoids():
    torch.manual_seed(0)
    embed = TimestepEmbedding(32, freq_dim=16, max_period=100.0)
    t = torch.tensor([0, 1, 250, 999])
    out = embed(t)
    torch.testing.assert_close(out, embed.mlp(timestep_embedding(t, 16, max_period=100.0)))
    assert out.shape == (4, 32) and torch.cdist(out, out).add(torch.eye(4)).min() > 1e-3  # every t its own


def test_resblock_is_its_skip_at_init():
    torch.manual_seed(0)
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    # The zero-initialised output conv makes the block its skip path: x itself, or its 1x1 projection.
    torch.testing.assert_close(ResBlock(16, 16, 24)(x, emb), x)
    wider = ResBlock(16, 32, 24)
    torch.testing.assert_close(wider(x, emb), wider.skip(x))


def test_downsample_and_upsample_are_strided_and_nearest_convolutions():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    down, up = Downsample(8), Upsample(8, 4)
    assert down.conv.out_channels == 8 and up.conv.out_channels == 4  # out_ch defaults to in_ch
    torch.testing.assert_close(down(x), F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))
    near = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # each pixel as a 2x2 block
    torch.testing.assert_close(up(x), F.conv2d(near, up.conv.weight, up.conv.bias, padding=1))
    assert down(x).shape == (2, 8, 3, 3) and up(x).shape == (2, 4, 12, 12)
    assert list(dict(up.named_parameters())) == ["conv.weight", "conv.bias"] and up.conv.weight.shape == (4, 8, 3, 3)


def _nearest_then_conv(x, weight, bias, padding="zeros"):
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if padding == "zeros":
        return F.conv2d(up, weight, bias, padding=1)
    return F.conv2d(F.pad(up, (1, 1, 1, 1), mode=padding), weight, bias)


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (3, 16, 9, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "reflect", "replicate", "circular"])
def test_upsample_phase_convolutions_equal_the_convolution_of_the_upsampled_map(shape, channels_last, padding):
    """The four 2x2 phase convolutions give the 3x3 convolution of the nearest-upsampled map, its gradients
    too (odd sizes, one pixel, either memory layout, which the output keeps), padded as `padding_mode` says."""
    torch.manual_seed(0)
    up = Upsample(shape[1], 5)
    up.conv.padding_mode = padding
    torch.nn.init.normal_(up.conv.weight)
    torch.nn.init.normal_(up.conv.bias)
    x = torch.randn(shape, requires_grad=True)
    inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out, ref = up(inp), _nearest_then_conv(inp, up.conv.weight, up.conv.bias, padding)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    layout = torch.channels_last if channels_last and shape[-1] > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    probe = torch.randn_like(ref)
    params = [x, up.conv.weight, up.conv.bias]
    grads = [torch.autograd.grad((y * probe).sum(), params) for y in (out, ref)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_upsample_rows_of_the_phase_convolution_are_the_rows_of_the_whole_output():
    """`interleave_phases` on the phase rows that output rows [a, b) read gives those rows, for every
    parity of a and b (what streaming asks for, band by band)."""
    from cascade.nn.resample import interleave_phases, phase_filters

    torch.manual_seed(0)
    up = Upsample(4, 3)
    x = torch.randn(1, 4, 6, 5)
    whole = up(x)
    weight, bias = phase_filters(up.conv.weight, up.conv.bias)
    padded = F.pad(x, (0, 0, 1, 1))  # row i of x is padded row i + 1
    for a in range(12):
        for b in range(a + 1, 13):
            first, last = (a + 1) // 2, b // 2 + 1  # the phase rows these output rows read
            phases = F.conv2d(padded[..., first:last + 1, :], weight, bias, padding=(0, 1))
            torch.testing.assert_close(interleave_phases(phases, 5, (a, b)), whole[..., a:b, :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upsample_runs_on_the_device_and_dtype_asked_for(dtype):
    """The folded taps are sums of two or four 3x3 taps, summed in fp32 and rounded once to the weights'
    dtype; the layer runs on CASCADE_TEST_DEVICE with no op off its device or dtype."""
    from cascade.nn.resample import phase_filters
    from test_devices import DEVICE, _Placement

    torch.manual_seed(0)
    up = Upsample(16, 8)
    torch.nn.init.normal_(up.conv.weight, std=0.3)
    x = torch.randn(2, 16, 8, 8)
    exact = up(x)
    up = up.to(DEVICE, dtype)
    folded, _ = phase_filters(up.conv.weight, None)
    torch.testing.assert_close(folded, phase_filters(up.conv.weight.float(), None)[0].to(dtype), rtol=0, atol=0)
    with torch.no_grad(), _Placement(DEVICE, dtype) as placement:
        out = up(x.to(DEVICE, dtype))
    assert not placement.wrong, placement.wrong[:5]
    assert out.dtype == dtype and out.device.type == DEVICE.type
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.float().cpu(), exact, rtol=tol, atol=tol)


def test_resblock_adaptive_norm_uses_embedding():
    torch.manual_seed(0)
    block = ResBlock(8, 8, 4)
    torch.nn.init.normal_(block.conv2.weight)
    x = torch.randn(2, 8, 6, 6)
    e1, e2 = torch.randn(1, 4).expand(2, 4), torch.randn(1, 4).expand(2, 4)
    assert not torch.allclose(block(x, e1), block(x, e2))
    # AdaGN with zero embedding projection is plain GroupNorm: (1 + 0) * GN(h) + 0.
    torch.nn.init.zeros_(block.emb.weight)
    torch.nn.init.zeros_(block.emb.bias)
    torch.testing.assert_close(block(x, e1), block(x, e2))


def _reference_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_cross_attention_matches_softmax_formula_and_ignores_masked_tokens():
    torch.manual_seed(0)
    attn = CrossAttention(32, 12, head_dim=16)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 12)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    out = attn(x, ctx, mask)
    q = attn.q(x).view(2, 5, 2, 16).transpose(1, 2)
    k, v = attn.kv(ctx).view(2, 7, 2, 2, 16).permute(2, 0, 3, 1, 4)
    ref = _reference_attention(q, k, v, mask[:, None, None, :]).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(out, attn.proj(ref), rtol=1e-4, atol=1e-5)
    ctx2 = ctx.clone()
    ctx2[0, 4:] = 100 * torch.randn(3, 12)
    torch.testing.assert_close(attn(x, ctx2, mask)[0], out[0])
    assert not torch.allclose(attn(x, ctx2, mask=None)[0], attn(x, ctx, mask=None)[0])


def test_cross_attention_all_masked_is_zero_not_nan():
    attn = CrossAttention(16, 8, head_dim=8)
    out = attn(torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool))
    torch.testing.assert_close(out, attn.proj.bias.expand(2, 3, 16))


def test_self_attention_2d_identity_at_init_and_context_mask():
    torch.manual_seed(0)
    attn = SelfAttention2d(32, head_dim=16, context_dim=10)
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 6, 10)
    mask = torch.tensor([[True, True, False, False, False, False]] * 2)
    torch.testing.assert_close(attn(x, ctx, mask), x)
    torch.nn.init.normal_(attn.proj.weight)
    out = attn(x, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[:, 2:] = torch.randn(2, 4, 10)
    torch.testing.assert_close(attn(x, ctx2, mask), out)
    ctx2[:, 0] = torch.randn(2, 10)
    assert not torch.allclose(attn(x, ctx2, mask), out)


def test_sincos_2d_features_are_row_major_and_tell_every_position_apart():
    from cascade.nn.attention import sincos_2d

    pos = sincos_2d(5, 16).view(5, 5, 16)  # [row, col]
    assert torch.equal(pos[0, :, :8], pos[3, :, :8])  # first half: the column only
    assert torch.equal(pos[:, 2, 8:], pos[:, 4, 8:])  # second half: the row only
    torch.testing.assert_close(pos[2, 3, :4], torch.sin(3 * 100.0 ** (-torch.arange(4.0) / 4)))
    flat = pos.reshape(25, 16)
    assert torch.cdist(flat, flat).add(torch.eye(25)).min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 10)


def test_self_attention_2d_position_embedding_breaks_translation_symmetry():
    torch.manual_seed(0)
    x = torch.randn(1, 32, 1, 1).expand(2, 32, 4, 4).contiguous()  # the same features at every position
    plain, placed = SelfAttention2d(32, head_dim=16), SelfAttention2d(32, head_dim=16, size=4)
    assert placed.pos.shape == (16, 32) and placed.pos.requires_grad
    for attn in (plain, placed):
        torch.nn.init.normal_(attn.proj.weight)
    out_plain, out_placed = plain(x), placed(x)
    assert torch.allclose(out_plain, out_plain[..., :1, :1].expand_as(out_plain), atol=1e-5)
    assert (out_placed - out_placed[..., :1, :1]).abs().amax() > 0.01  # positions now differ (plain: < 1e-5)
    with pytest.raises(ValueError, match="16 positions"):
        placed(torch.randn(1, 32, 8, 8))


def test_transformer_block_causal_ignores_future():
    torch.manual_seed(0)
    block = TransformerBlock(32, head_dim=16, causal=True).eval()
    x = torch.randn(2, 6, 32)
    y = block(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 32)
    y2 = block(x2)
    torch.testing.assert_close(y2[:, :4], y[:, :4])
    assert not torch.allclose(y2[:, 4:], y[:, 4:])
    # With a key mask the causal structure still holds, and no row is NaN even if token 0 is masked.
    mask = torch.tensor([[False, True, True, True, True, True]] * 2)
    ym, ym2 = block(x, mask), block(x2, mask)
    assert torch.isfinite(ym).all()
    torch.testing.assert_close(ym2[:, :4], ym[:, :4])


def test_transformer_block_cross_attention_and_mask():
    torch.manual_seed(0)
    block = TransformerBlock(32, head_dim=16, context_dim=8).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 8)
    cmask = torch.tensor([[True, False, False]] * 2)
    y = block(x, context=ctx, context_mask=cmask)
    ctx2 = ctx.clone()
    ctx2[:, 1:] = torch.randn(2, 2, 8)
    torch.testing.assert_close(block(x, context=ctx2, context_mask=cmask), y)
    assert not torch.allclose(block(x, context=ctx), y)


def test_self_attention_key_mask():
    torch.manual_seed(0)
    attn = SelfAttention(16, head_dim=8)
    x = torch.randn(1, 4, 16)
    mask = torch.tensor([[True, True, True, False]])
    x2 = x.clone()
    x2[:, 3] = torch.randn(16)
    torch.testing.assert_close(attn(x2, mask)[:, :3], attn(x, mask)[:, :3])


def test_self_attention_fully_masked_sequence_is_finite():
    attn = SelfAttention(16, head_dim=8)
    out = attn(torch.randn(2, 4, 16), torch.tensor([[False] * 4, [True] * 4]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], attn.proj.bias.expand(4, 16))


def test_upsample_benchmark_times_both_ways_at_every_shape(monkeypatch, capsys, one_thread):
    """benchmarks/upsample_phases.py: one JSON line, both timings and their difference per shape."""
    import json

    from benchmarks.upsample_phases import SHAPES, main

    monkeypatch.setattr("sys.argv", ["upsample_phases", "--runs", "1"])
    main()
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in SHAPES:
        row = record[name]
        assert row["ms_phases"] > 0 and row["ms_upsampled_conv"] > 0 and row["max_abs_diff"] < 1e-4

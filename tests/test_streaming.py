"""Row-streamed inference of the super-resolution U-Net (`superres.streaming`): the same output as the
whole-image forward, in memory that does not grow with the image's height, on the device and dtype asked."""
import os

import pytest
import torch

from cascade.config import parse_config
from cascade.errors import UserError
from cascade.registry import get_stage
from superres.streaming import _Conv, _graph, _nodes, streamed_forward
from superres.unet import EfficientUNet

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = torch.device(os.environ.get("CASCADE_TEST_DEVICE", "cpu"))


def _net(seed=0, **kw):
    """A small random net whose every parameter is non-zero (the zero-initialised output layers too)."""
    torch.manual_seed(seed)
    args = dict(base_channels=8, channel_mults=[1, 2, 4], num_res_blocks=[1, 1, 2])
    net = EfficientUNet(**{**args, **kw}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _inputs(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, h, w, generator=g), torch.randn(b, 3, h, w, generator=g),
            torch.randint(0, 1000, (b,), generator=g), torch.rand(b, generator=g))


@pytest.mark.parametrize("h,w,rows", [(64, 64, 16), (96, 40, 7), (48, 64, 1), (32, 32, 100), (128, 64, 32)])
def test_streamed_forward_equals_the_whole_image_forward(h, w, rows):
    """Bands that do not divide the height, one row at a time, a band taller than the image, a wide image."""
    net = _net()
    x, low, t, s = _inputs(2, h, w)
    with torch.no_grad():
        whole = net(x, low, t, s)
        streamed = streamed_forward(net, x, low, t, s, rows=rows)
    assert streamed.shape == whole.shape and streamed.is_contiguous()
    assert whole.abs().max() > 0.1  # the random output layers make a non-trivial output
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-4)


def test_streamed_forward_with_text_cross_attention_matches_and_reads_the_text():
    net = _net(text_dim=12, head_dim=8)
    x, low, t, s = _inputs(2, 64, 48)
    text = torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])  # the second image has no text
    with torch.no_grad():
        whole = net(x, low, t, s, text, mask)
        streamed = streamed_forward(net, x, low, t, s, text, mask, rows=16)
        other = streamed_forward(net, x, low, t, s, torch.randn(2, 5, 12), mask, rows=16)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(other[0], streamed[0])  # the first image's text reaches the output
    torch.testing.assert_close(other[1], streamed[1])  # a fully masked text adds nothing


def _drive(net, h, w, rows):
    """Run the graph of one image band by band; the largest number of rows any node kept at once."""
    x, low, t, s = _inputs(1, h, w)
    emb = net.embed(t, s)
    out = _graph(net, x, low, emb, None, None)
    nodes = [n for n in _nodes(out) if isinstance(n, _Conv)]  # every conv the output depends on
    peak = 0
    with torch.no_grad():
        for a in range(0, h, rows):
            out._compute(a, min(a + rows, h), None)
            peak = max(peak, max(n.end - n.start for n in nodes))
    return peak, len(nodes)


def test_streaming_keeps_a_band_of_rows_however_tall_the_image():
    """Memory is bounded by the band and the receptive field, not the height: a 4x taller image keeps no
    more rows of any feature map."""
    net = _net()
    short, n_nodes = _drive(net, 128, 32, 16)
    tall, _ = _drive(net, 512, 32, 16)
    assert n_nodes > 20  # every conv of the U-Net is a node
    assert tall == short and short < 128


def test_a_full_buffer_is_reused_not_allocated_again_every_few_bands():
    """When a node's buffer fills, the rows it keeps move to the buffer's top: a 512-row image in bands
    of 8 allocates each node's buffer a few times at most (it grows while the kept rows do), not once
    every few bands (64 bands), and gives the whole-image output."""
    net = _net()
    x, low, t, s = _inputs(1, 512, 16)
    out = _graph(net, x, low, net.embed(t, s), None, None)
    nodes = [n for n in _nodes(out) if isinstance(n, _Conv)]
    seen = {id(n): [] for n in nodes}  # every buffer object each node had (held, so no id is reused)
    bands = []
    with torch.no_grad():
        for a in range(0, 512, 8):
            bands.append(out._compute(a, a + 8, None))
            for n in nodes:
                if n.buffer is not None and not any(n.buffer is b for b in seen[id(n)]):
                    seen[id(n)].append(n.buffer)
        whole = net(x, low, t, s)
    assert max(len(b) for b in seen.values()) <= 4
    torch.testing.assert_close(torch.cat(bands, dim=-2), whole, atol=1e-5, rtol=1e-4)


def test_a_skip_connection_keeps_its_rows_in_a_ring_smaller_than_the_image():
    """A node that keeps many rows (the skip connection the up path reads long after the down path wrote
    it) keeps them in a ring: on a tall image its buffer holds a fraction of the rows that passed through
    it, so its writes and reads went round the ring's end (a band computed in two calls, a read that is a
    copy), and the output is still the whole-image forward's."""
    net = _net()
    x, low, t, s = _inputs(1, 512, 16)
    out = _graph(net, x, low, net.embed(t, s), None, None)
    nodes = _nodes(out)
    for n in nodes:
        n.band = -(-8 * n.height // out.height)
    with torch.no_grad():
        bands = [out._compute(a, a + 8, None) for a in range(0, 512, 8)]
        whole = net(x, low, t, s)
    rings = [n for n in nodes if n.ring]
    assert rings and all(n.buffer.shape[-2] < n.height // 2 for n in rings)
    torch.testing.assert_close(torch.cat(bands, dim=-2), whole, atol=1e-5, rtol=1e-4)


def test_lower_levels_compute_at_least_min_rows_per_call(monkeypatch):
    """In bands of 8 output rows the lowest level (a quarter of the height) is asked for 2 rows a band;
    with min_rows=8 it computes 8 at a time, ahead of what is asked, in a quarter of the calls, and the
    output is the same."""
    net = _net()
    x, low, t, s = _inputs(1, 256, 16)
    calls = []
    real = _Conv._compute
    with torch.no_grad():  # the buffers' sizes are planned once per height (a run on a narrow copy) and cached
        streamed_forward(net, x, low, t, s, rows=8, min_rows=1)
        streamed_forward(net, x, low, t, s, rows=8, min_rows=8)
    monkeypatch.setattr(_Conv, "_compute", lambda self, a, b, out: calls.append((self.height, a, b)) or real(self, a, b, out))
    with torch.no_grad():
        thin = streamed_forward(net, x, low, t, s, rows=8, min_rows=1)
        thin_calls, calls[:] = list(calls), []
        tall = streamed_forward(net, x, low, t, s, rows=8, min_rows=8)
    torch.testing.assert_close(tall, thin, atol=1e-5, rtol=1e-4)
    bottom = 256 // net.downsample_factor
    n_thin = sum(1 for h, _, _ in thin_calls if h == bottom)
    n_tall = sum(1 for h, _, _ in calls if h == bottom)
    assert n_tall <= n_thin / 3
    assert max(b - a for h, a, b in thin_calls if h == bottom) <= 4  # 2 rows a band (and a few for the halo)
    # shorter calls only where the image ends, or where a band reaches the end of a ring (two calls)
    assert len([a for h, a, b in calls if h == bottom and b - a < 8 and b < bottom]) <= 2


def test_buffers_are_planned_on_a_narrow_copy_and_never_grow_in_the_run(monkeypatch):
    """Which rows a node keeps does not depend on the width: a run on a narrow copy of the image gives every
    buffer's final size (cached on the net per height), and the real run allocates each once, up front, at
    that size: none is allocated again while the bands run, and the output is the whole image's."""
    import superres.streaming as streaming

    net = _net()
    x, low, t, s = _inputs(1, 256, 48)
    with torch.no_grad():
        streamed_forward(net, x, low, t, s, rows=16)  # plans (a run two columns wide at the lowest level)
        assert len(net.__dict__["_streaming_plans"]) == 1
        grown = []
        real = streaming._Rows._new
        monkeypatch.setattr(streaming._Rows, "_new", lambda self, *a: grown.append(self) or real(self, *a))
        streamed = streamed_forward(net, x, low, t, s, rows=16)
        whole = net(x, low, t, s)
    assert grown == []
    assert len(net.__dict__["_streaming_plans"]) == 1  # the same height reuses the plan
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixel_norm_written_over_its_input_is_the_norm(dtype):
    """`PixelNorm.normalise_` (what streaming runs on an up block's fresh concatenation) is the norm's
    forward, computed over x, in x's dtype and layout."""
    from superres.blocks import PixelNorm

    norm = PixelNorm(12).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 12))
        x = torch.randn(2, 12, 5, 7, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
        expected = norm(x)
        y = x.clone()
        got = norm.normalise_(y)
    assert got.data_ptr() == y.data_ptr() and got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    assert not torch.allclose(got.float(), x.float())


def test_rows_asked_again_after_they_were_dropped_are_an_error():
    net = _net()
    x, low, t, s = _inputs(1, 64, 32)
    emb = net.embed(t, s)
    out = _graph(net, x, low, emb, None, None)
    reader = out.reader()
    with torch.no_grad():
        out.get(0, 16, reader)
        out.get(16, 32, reader)
        with pytest.raises(RuntimeError, match="dropped"):
            out.get(0, 8, reader)
    with pytest.raises(ValueError):
        streamed_forward(net, x, low, t, s, rows=0)


def _sr1024(**overrides):
    cls = get_stage("sr1024")
    base = dict(base_channels=8, channel_mults=[1, 2, 4], num_res_blocks=[1, 1, 2], train_crop=64,
                residual=True, prediction="x0")
    return cls(parse_config(cls.Config, {**base, **overrides}))


def test_the_stage_streams_when_configured_and_samples_what_the_whole_image_gives():
    streamed = _sr1024(stream_rows=32, tile_size=None)
    whole = _sr1024(tile_size=None)
    whole.load_state_dict(streamed.state_dict())
    for stage in (streamed, whole):
        with torch.no_grad():
            for p in stage.net.conv_out.parameters():  # a fresh x0 model outputs exactly zero
                p.add_(0.05)
    low = torch.rand(1, 3, 32, 32) * 2 - 1
    a = streamed.sample({"low_res": low}, steps=2, generator=torch.Generator().manual_seed(0))
    b = whole.sample({"low_res": low}, steps=2, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 3, 128, 128)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # training keeps the whole patch (streaming runs only without autograd), and the gradient flows
    batch = {"sr_low": low[..., :16, :16], "sr_high": torch.rand(1, 3, 64, 64) * 2 - 1}
    streamed.loss(batch).backward()
    assert streamed.net.conv_in.weight.grad is not None


def test_streaming_runs_only_on_images_larger_than_tile_size(monkeypatch):
    import superres.stage

    calls = []
    real = superres.stage.streamed_forward
    monkeypatch.setattr(superres.stage, "streamed_forward", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    stage = _sr1024(stream_rows=16, tile_size=64)
    with torch.no_grad():
        for size in (64, 128):
            x = torch.randn(1, 3, size, size)
            stage(x, x, torch.tensor([10]), torch.tensor([0.1]))
    assert calls == [(1, 3, 128, 128)]


def test_weights_brought_in_by_forward_hooks_or_a_compiled_net_fall_back_to_the_tiles(monkeypatch):
    """accelerate's sequential offload keeps the weights on the meta device until each module's forward,
    and ZeRO-3 gathers them in one: streaming, which reads them directly, must not run there; nor on a
    compiled net, whose compiled call is what was asked for."""
    from accelerate import cpu_offload

    import superres.stage

    calls = []
    real = superres.stage.streamed_forward
    monkeypatch.setattr(superres.stage, "streamed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = _sr1024(stream_rows=16, tile_size=64, tile_margin=32)
    with torch.no_grad():
        for p in plain.net.conv_out.parameters():
            p.add_(0.05)
    x = torch.randn(1, 3, 128, 128)
    args = (x, x, torch.tensor([10]), torch.tensor([0.1]))
    with torch.no_grad():
        expected = plain(*args)
        assert calls == [1]
        offloaded = _sr1024(stream_rows=16, tile_size=64, tile_margin=32)
        offloaded.load_state_dict(plain.state_dict())
        cpu_offload(offloaded, execution_device=torch.device("cpu"))
        got = offloaded(*args)
        assert calls == [1]  # the tiles ran
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)  # 32-px margins: seams within rounding
        sharded = _sr1024(stream_rows=16, tile_size=64)
        next(sharded.net.parameters()).ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
        sharded(*args)
        assert calls == [1]
        compiled = _sr1024(stream_rows=16, tile_size=64)
        compiled.compile_networks(backend="eager")  # the compiled call is what --compile asks for
        compiled(*args)
        assert calls == [1]


def test_stream_rows_below_one_is_a_config_error():
    with pytest.raises(UserError, match="stream_rows"):
        _sr1024(stream_rows=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_forward_stays_on_the_device_and_dtype_of_the_net(dtype):
    net = _net().to(DEVICE, dtype)
    x, low, t, s = (v.to(DEVICE) for v in _inputs(1, 64, 32))
    with torch.no_grad():
        whole = net(x, low, t, s)
        streamed = streamed_forward(net, x, low, t, s, rows=16)
    assert streamed.device.type == DEVICE.type and streamed.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(streamed.float(), whole.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (2, 1, 1), (5, 1, 2), (3, 2, 0)])
def test_a_band_at_the_image_edge_is_convolved_as_the_zero_padded_map(k, stride, pad):
    """`_conv_rows` pads the rows at the image's edges inside the convolution (and drops the rows that
    padding adds where it was not needed): every band, at the top, inside, at the bottom, of even and odd
    heights, gives the rows of the whole map's zero-padded convolution."""
    from superres.streaming import _conv_rows

    g = torch.Generator().manual_seed(k * 10 + stride)
    weight, bias = torch.randn(4, 3, k, k, generator=g), torch.randn(4, generator=g)
    for height in (12, 13):
        x = torch.randn(1, 3, height, 9, generator=g)
        whole = torch.nn.functional.conv2d(x, weight, bias, stride=stride, padding=pad)
        for a, b in [(0, 2), (1, 4), (0, whole.shape[-2]), (whole.shape[-2] - 2, whole.shape[-2]), (2, 3)]:
            lo, hi = a * stride - pad, (b - 1) * stride - pad + k
            lo_c, hi_c = max(lo, 0), min(hi, height)
            got = _conv_rows(x[..., lo_c:hi_c, :], weight, bias, (lo, hi), (lo_c, hi_c), stride, pad, b - a)
            torch.testing.assert_close(got, whole[..., a:b, :], msg=f"height {height}, rows {a}:{b}")

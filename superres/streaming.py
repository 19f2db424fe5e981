"""Row-streamed inference for the super-resolution U-Net: every pixel computed once, in bounded memory.

Two ways to run `EfficientUNet` on a 1024x1024 image were measured before (docs/results.md): the whole
image at once keeps every feature map of the forward alive (620 MB at 1024^2 for the tiny net), and
blended tiles recompute their margins (256-px tiles with 16-px margins: 1.2x the pixels). Streaming
does neither. Every layer of the net is local in space, and an output row of a 3x3 convolution needs
three rows of its input. So the forward runs from the top of the image to the bottom in bands of output
rows, and each feature map of the forward is a `_Rows` node that

* computes the rows it is asked for once, pulling the rows it needs from the nodes it reads;
* keeps them while some consumer may still ask for them (a convolution's next band re-reads the last
  rows of the previous one; a skip connection is read by the up path long after the down path used it);
* drops the rows every consumer has moved past.

What stays alive is a band of every feature map plus, per level, the rows by which the down path runs
ahead of the up path (the receptive field of the levels below), which the skip connection must keep
(in a ring, so they never move): 116 MB of buffers at 1024^2 for the tiny net in bands of 64 rows, the
lower levels computing at least 32 rows per call (110 MB in bands of 32), however tall the image. Each
buffer is allocated once, at its final size, from a plan made on a narrow copy of the image (`_plan`). The
output equals the whole-image forward up to float rounding (the convolutions see the same numbers in
differently shaped calls).

`streamed_forward(net, ...)` takes the arguments of `EfficientUNet.forward` and a band height; the
graph of nodes mirrors `EfficientUNet.forward` (keep the two in step).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cascade.nn.resample import interleave_phases, phase_filters
from superres.unet import EfficientUNet

CL = torch.channels_last
# no level computes fewer rows per call than this: in bands of 64 rows at 1024^2 the lowest level's share
# is 16, and such thin calls cost ~6% of a step more (their fixed costs, the halo rows re-normalised)
MIN_ROWS = 32


class _Rows:
    """Rows [0, height) of one (1, C, height, W) feature map, computed on demand from top to bottom.

    Subclasses compute rows [a, b) in `_compute(a, b, out)`, into `out` (a view of the buffer) when it
    is given. A consumer registers once (`reader()`) and then asks for rows with `get(a, b, reader)`; its
    requests must not move up the image. Rows above the first row that every consumer last asked for
    are dropped. A node that keeps a few rows between bands moves them to the top of its buffer when it
    is full; one that keeps many keeps them in a ring (`_make_room`).
    """

    def __init__(self, height: int):
        self.height = height
        self.start = self.end = 0  # rows [start, end) are kept, at buffer rows `_slot(start)` on
        self.buffer: torch.Tensor | None = None
        self.offset = 0  # row r is at buffer row offset + r - start; in a ring, at r % (buffer rows)
        self.ring = False
        self.readers: list[int] = []  # the first row each consumer last asked for
        self.band: int | None = None  # rows computed per call (set by streamed_forward)
        self.ahead = False  # compute a whole band when asked for fewer rows (set by streamed_forward)

    def reader(self) -> int:
        self.readers.append(0)
        return len(self.readers) - 1

    def _compute(self, a: int, b: int, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _slot(self, r: int) -> int:
        return r % self.buffer.shape[-2] if self.ring else self.offset + r - self.start

    def _rows(self, a: int, b: int) -> torch.Tensor:
        """Kept rows [a, b): a view of the buffer, or a copy where they wrap around the end of a ring."""
        p, size = self._slot(a), self.buffer.shape[-2]
        if p + b - a <= size:
            return self.buffer[..., p:p + b - a, :]
        return torch.cat([self.buffer[..., p:, :], self.buffer[..., :p + b - a - size, :]], dim=-2)

    def _make_room(self, n: int) -> None:
        """Room in the buffer for the next n rows, after dropping the rows every reader has passed."""
        first = min(self.readers) if self.readers else self.end
        if first > self.start:
            if not self.ring:
                self.offset += first - self.start
            self.start = first
        kept, size = self.end - self.start, self.buffer.shape[-2]
        if (kept + n <= size) if self.ring else (self.offset + kept + n <= size):
            return
        if self.ring or kept > 2 * n:
            # a node that keeps many rows (a skip connection, read by the up path long after the down path
            # wrote it) keeps them in a ring: they never move again, and it needs room for them, the new
            # rows and some slack (room for two more bands: the first band pulls the receptive field of the
            # levels below, and a ring that grows holds its old and new buffer at once), not twice what
            # it keeps. A read that wraps around the end is a copy of those rows (a few per image)
            self._move(self._new(max(kept + 3 * n, size + size // 4), self.buffer), ring=True)
        elif size >= kept + n + kept:
            # a node that keeps a few halo rows (most: a 3x3 convolution's input keeps its last two) has
            # room for them twice and a band; they move to its top, a copy of a few rows, and they do not
            # overlap where they go (a full buffer of this size has offset > kept)
            self._move(self.buffer, ring=False)
        else:
            self._move(self._new(kept + n + kept, self.buffer), ring=False)

    def _new(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        shape = like.shape[:2] + (rows, like.shape[-1])
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=CL)

    def _move(self, buffer: torch.Tensor, ring: bool) -> None:
        """The kept rows into `buffer`, from its top or, in a ring, at their slots."""
        old, r, size = self.buffer, self.start, buffer.shape[-2]
        while r < self.end:  # in pieces that wrap around neither buffer's end
            p, q = self._slot(r), (r % size if ring else r - self.start)
            m = min(self.end - r, old.shape[-2] - p, size - q)
            buffer[..., q:q + m, :] = old[..., p:p + m, :]
            r += m
        self.buffer, self.offset, self.ring = buffer, 0, ring

    def get(self, a: int, b: int, reader: int) -> torch.Tensor:
        a, b = max(a, 0), min(b, self.height)
        if a < self.start or a < self.readers[reader]:
            raise RuntimeError(f"rows from {a} asked after they were dropped (first kept: {self.start})")
        self.readers[reader] = a  # before computing, so that the rows this reader passed can go
        while b > self.end:
            # at most `band` rows per call: a request that reaches far ahead (the first band, which pulls
            # the receptive field of the levels below) then does not make every node above hold as much.
            # A band and a few halo rows go in one call, not as a band and then a sliver, which would size
            # the buffer for keeping a whole band
            if not self.band:
                e = b
            elif 4 * (b - self.end) <= 5 * self.band:
                e = max(b, min(self.end + self.band, self.height)) if self.ahead else b
            else:
                e = self.end + self.band
            if self.buffer is None:  # the first rows tell the channels, width and dtype
                new = self._compute(self.end, e, None)
                self.buffer = self._new(e - self.end, new)
                self.buffer[..., :e - self.end, :] = new
                self.end = e
                continue
            self._make_room(e - self.end)
            while self.end < e:  # in a ring, rows that reach its end are computed in two calls
                p = self._slot(self.end)
                m = min(e - self.end, self.buffer.shape[-2] - p)
                self._compute(self.end, self.end + m, self.buffer[..., p:p + m, :])
                self.end += m
        return self._rows(a, b)


class _Input(_Rows):
    """A tensor that already exists whole (the network's inputs): rows are views, nothing is cached."""

    def __init__(self, x: torch.Tensor):
        super().__init__(x.shape[-2])
        self.x = x

    def get(self, a: int, b: int, reader: int) -> torch.Tensor:
        return self.x[..., max(a, 0):min(b, self.height), :]


Post = Callable[[torch.Tensor, int, int, "torch.Tensor | None"], torch.Tensor]


class _Conv(_Rows):
    """post(conv(pre(inputs' rows)), a, b, out): one convolution (stride 1 or 2, odd kernel, 'same'-style
    padding), with row-aligned maps before and after it.

    `pre(*rows)` maps the inputs' rows to the convolution's input (concatenation, norm, SiLU);
    `post(h, a, b, out)` maps its output rows [a, b) (a SiLU, a residual sum that reads other nodes),
    writing into `out` when given. The top and bottom zero padding of the whole-image convolution is
    added where a band touches an edge of the image, so each output row sees exactly what it sees in
    the whole-image forward.
    """

    def __init__(self, conv: nn.Conv2d, inputs: Sequence[_Rows], pre: Callable[..., torch.Tensor] | None = None,
                 post: Post | None = None, claims: Sequence[tuple[_Rows, int]] = (),
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        in_height = inputs[0].height
        super().__init__((in_height + 2 * p - k) // s + 1)
        self.conv, self.k, self.s, self.p, self.in_height = conv, k, s, p, in_height
        # the weights in the activations' layout once, not on every band's call
        # `weight`, `bias`: ones that fold in what the layers after the conv would do (FiLM, a 1x1 skip's bias)
        self.weight = (conv.weight if weight is None else weight).contiguous(memory_format=CL)
        self.bias = conv.bias if bias is None else bias
        self.inputs = [(node, node.reader()) for node in inputs]
        self.pre, self.post = pre, post
        self.claims = list(claims)  # (node, reader) that `post` reads at this node's rows

    def _compute(self, a: int, b: int, out: torch.Tensor | None) -> torch.Tensor:
        for node, r in self.claims:  # `post` will ask from row a: the rows above may go while the inputs compute
            node.readers[r] = max(node.readers[r], a)
        lo, hi = a * self.s - self.p, (b - 1) * self.s - self.p + self.k  # rows of the conv's input
        lo_c, hi_c = max(lo, 0), min(hi, self.in_height)
        rows = [node.get(lo_c, hi_c, r) for node, r in self.inputs]
        x = self.pre(*rows) if self.pre is not None else rows[0]
        conv = self.conv
        h = _conv_rows(x, self.weight, self.bias, (lo, hi), (lo_c, hi_c), self.s, conv.padding[1], b - a)
        if self.post is not None:
            return self.post(h, a, b, out)
        return h if out is None else out.copy_(h)


def _conv_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, window: tuple[int, int],
               have: tuple[int, int], stride: int, pad_width: int, n: int) -> torch.Tensor:
    """The n output rows of a convolution whose input window is rows [lo, hi) of a map, of which `x` holds
    rows [lo_c, hi_c) (the window clipped to the image): the rows outside the image are zeros.

    At an edge of the image the convolution pads the rows itself, as many above as below; the output
    rows of the side that needed none (a row or two) are dropped. That costs less than F.pad, which
    writes the whole band again with zeros around it."""
    (lo, hi), (lo_c, hi_c) = window, have
    top, bottom = lo_c - lo, hi - hi_c
    pad = max(top, bottom)
    if (pad - top) % stride:  # the first output row would start between two of the window's: pad exactly
        x, pad, top = F.pad(x, (0, 0, top, bottom)), 0, 0
    h = F.conv2d(x.contiguous(memory_format=CL), weight, bias, stride=stride, padding=(pad, pad_width))
    first = (pad - top) // stride
    return h if first == 0 and h.shape[-2] == n else h[..., first:first + n, :]


class _UpConv(_Rows):
    """`cascade.nn.NearestUpConv`: the 3x3 convolution of the input upsampled 2x, as its four 2x2 phase
    convolutions at the input's resolution, interleaved into the output rows."""

    def __init__(self, conv: nn.Conv2d, node: _Rows):
        super().__init__(2 * node.height)
        self.node, self.r = node, node.reader()
        weight, self.bias = phase_filters(conv.weight, conv.bias)  # built under streamed_forward's no_grad
        self.weight = weight.contiguous(memory_format=CL)

    def _compute(self, a: int, b: int, out: torch.Tensor | None) -> torch.Tensor:
        # output row r reads phase row (r + 1) // 2, which reads input rows (r + 1) // 2 - 1 and (r + 1) // 2
        lo, hi = (a + 1) // 2 - 1, b // 2 + 1  # the input rows, zero above and below the image
        lo_c, hi_c = max(lo, 0), min(hi, self.node.height)
        x = self.node.get(lo_c, hi_c, self.r)
        phases = _conv_rows(x, self.weight, self.bias, (lo, hi), (lo_c, hi_c), 1, 1, hi - lo - 1)
        return interleave_phases(phases, x.shape[-1], (a, b), out)


class _Map(_Rows):
    """fn(rows of the input): a map that keeps rows aligned (each output row from the same input row)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], node: _Rows):
        super().__init__(node.height)
        self.fn, self.node, self.r = fn, node, node.reader()

    def _compute(self, a: int, b: int, out: torch.Tensor | None) -> torch.Tensor:
        y = self.fn(self.node.get(a, b, self.r))
        return y if out is None else out.copy_(y)


def _block(block: nn.Module, inputs: Sequence[_Rows], emb: torch.Tensor) -> _Rows:
    """A `superres.blocks.LocalResBlock` on the channel concatenation of `inputs`: two conv nodes (the
    residual sum and the skip's 1x1 convolution are the second one's `post`)."""
    scale, shift = block.emb(F.silu(emb)).flatten().chunk(2)  # one image: (C,) each
    # FiLM, (1 + scale) * conv1(x) + shift, is constant over the image, so it goes into conv1's weights and
    # bias once instead of a pass over every band: conv1's output only needs its SiLU
    conv1 = block.conv1
    weight = (conv1.weight.detach() * (1 + scale)[:, None, None, None]).to(conv1.weight.dtype)
    bias = (shift if conv1.bias is None else torch.addcmul(shift, conv1.bias.detach(), 1 + scale)).to(weight.dtype)

    def pre(*rows):
        if len(rows) == 1:  # rows of a buffer: the norm writes a new map
            return F.silu(block.norm(rows[0]), inplace=True)
        # an up block's input and skip: their concatenation is a new map, which the norm and SiLU overwrite
        # (the whole-image forward cannot: its block reads the concatenation again for the 1x1 skip)
        return F.silu(block.norm.normalise_(torch.cat(rows, dim=1)), inplace=True)

    def silu(h, a, b, out):
        return F.silu(h, inplace=True) if out is None else torch.ops.aten.silu.out(h, out=out)

    inner = _Conv(conv1, inputs, pre=pre, post=silu, weight=weight, bias=bias)
    readers = [(node, node.reader()) for node in inputs]
    skip = block.skip
    if isinstance(skip, nn.Identity):
        def residual(h, a, b, out):
            return torch.add(readers[0][0].get(a, b, readers[0][1]), h, out=out)
        return _Conv(block.conv2, [inner], post=residual, claims=readers)

    # the 1x1 skip as one matrix product per input on the channels-last rows, summed into the conv's
    # output: no concatenation (the norm's is of other rows) and no separate sum; its bias joins conv2's
    weight = skip.weight.detach()[:, :, 0, 0].t()  # (in, out)

    def residual(h, a, b, out):
        rows = [node.get(a, b, r) for node, r in readers]
        weights = weight.split([x.shape[1] for x in rows])
        if out is not None and out.is_contiguous(memory_format=CL):  # a view of the buffer: written in place
            target, first = out, 1
            torch.addmm(_matrix(h), _matrix(rows[0]), weights[0], out=_matrix(out))
        else:
            target, first = h.contiguous(memory_format=CL), 0
        acc = _matrix(target)
        for x, w in zip(rows[first:], weights[first:]):
            acc.addmm_(_matrix(x), w)
        return target if out is None or target is out else out.copy_(target)

    biases = [c.bias.detach() for c in (block.conv2, skip) if c.bias is not None]
    return _Conv(block.conv2, [inner], post=residual, claims=readers,
                 bias=sum(biases[1:], biases[0]) if biases else None)


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """A (1, C, R, W) map as its channels-last (R * W, C) matrix: a view where the map is channels-last."""
    if not x.is_contiguous(memory_format=CL):
        x = x.contiguous(memory_format=CL)
    return x.permute(0, 2, 3, 1).view(-1, x.shape[1])


@torch.no_grad()  # the nodes' maps are written in place
def streamed_forward(net: EfficientUNet, x_t: torch.Tensor, low_res_up: torch.Tensor, t: torch.Tensor,
                     aug_level: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                     *, rows: int = 32, min_rows: int = MIN_ROWS) -> torch.Tensor:
    """`net(x_t, low_res_up, t, aug_level, text, text_mask)` computed `rows` output rows at a time, one
    image of the batch after the other. For inference: no autograd graph is kept across bands.

    Each level of the net computes its share of a band (rows / 2 per level down), but at least `min_rows`
    rows per call: a lower level whose share is smaller computes ahead, in fewer and taller calls."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    emb = net.embed(t, aug_level)  # (B, E)
    if text is not None and text_mask is None:
        text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    out = None
    for i in range(x_t.shape[0]):
        one = slice(i, i + 1)
        args = (x_t[one], low_res_up[one], emb[one],
                None if text is None else text[one], None if text_mask is None else text_mask[one])
        node = _scheduled(_graph(net, *args), rows, min_rows)
        # every buffer at the size it would grow to, allocated before the first band's temporaries: no buffer
        # is allocated, copied and freed again while the first band pulls the receptive field of the levels
        # below, which leaves malloc's heap holding more than the step needs
        width = x_t.shape[-1]
        for n, planned in zip(_nodes(node), _plan(net, args, rows, min_rows)):
            if planned is not None:
                channels, buffer_rows, per_column, dtype, n.ring = planned
                n.buffer = torch.empty((1, channels, buffer_rows, width // per_column), dtype=dtype,
                                       device=x_t.device, memory_format=CL)
        for a in range(0, node.height, rows):  # the output's rows go straight to `out`, unbuffered
            b = min(a + rows, node.height)
            if out is None:
                band = node._compute(a, b, None)
                out = band.new_empty((x_t.shape[0], band.shape[1], node.height, band.shape[-1]))
                out[one, :, a:b, :] = band
            else:
                node._compute(a, b, out[one, :, a:b, :])
    return out


def _scheduled(node: _Rows, rows: int, min_rows: int) -> _Rows:
    """`node` (the output) with each node's rows per call set: a band of output rows is this many rows of
    each feature map, and at least `min_rows` (the lower levels compute ahead)."""
    for n in _nodes(node):
        n.band = -(-rows * n.height // node.height)
        if n.band < min(min_rows, n.height):
            n.band, n.ahead = min(min_rows, n.height), True
    return node


def _plan(net: EfficientUNet, args: tuple, rows: int, min_rows: int) -> list[tuple | None]:
    """Each node's final buffer, in `_nodes` order: (channels, rows, image columns per buffer column, dtype,
    ring), or None. Which rows a node keeps does not depend on the image's width, so a run of the bands on a
    narrow copy of the image (two columns at the lowest level) tells them; cached on the net per height."""
    x_t, _, emb, text, text_mask = args
    key = (x_t.shape[-2], rows, min_rows, text is None, x_t.dtype, net.conv_in.weight.dtype, x_t.device)
    plans = net.__dict__.setdefault("_streaming_plans", {})
    if key not in plans:
        narrow = torch.zeros(x_t.shape[:-1] + (2 * net.downsample_factor,), dtype=x_t.dtype, device=x_t.device)
        node = _scheduled(_graph(net, narrow, narrow, emb, text, text_mask), rows, min_rows)
        for a in range(0, node.height, rows):
            node._compute(a, min(a + rows, node.height), None)
        plans[key] = [None if n.buffer is None else
                      (n.buffer.shape[1], n.buffer.shape[-2], narrow.shape[-1] // n.buffer.shape[-1], n.buffer.dtype,
                       n.ring)
                      for n in _nodes(node)]
    return plans[key]


def _nodes(out: _Rows) -> list[_Rows]:
    """Every node `out` reads, directly or not, and `out`."""
    seen, todo = [], [out]
    while todo:
        node = todo.pop()
        if not any(node is n for n in seen):
            seen.append(node)
            if isinstance(node, _Conv):
                todo += [n for n, _ in node.inputs]
            elif isinstance(node, (_Map, _UpConv)):
                todo.append(node.node)
    return seen


def _graph(net: EfficientUNet, x_t: torch.Tensor, low_res_up: torch.Tensor, emb: torch.Tensor,
           text: torch.Tensor | None, text_mask: torch.Tensor | None) -> _Rows:
    """The nodes of `EfficientUNet.forward` for one image; returns the output's node."""
    dtype = net.conv_in.weight.dtype
    h: _Rows = _Conv(net.conv_in, [_Input(x_t), _Input(low_res_up)],
                     pre=lambda x, low: torch.cat([x, low], dim=1).to(dtype))
    skips = []
    for sampler, blocks in zip(net.down_samplers, net.down_blocks):
        if not isinstance(sampler, nn.Identity):
            h = _Conv(sampler.conv, [h])
        for block in blocks:
            h = _block(block, [h], emb)
        skips.append(h)
    h = _block(net.mid1, [h], emb)
    if net.cross_attn is not None and text is not None:
        attn, tokens = net.cross_attn, text.to(dtype)
        h = _Map(lambda x: attn(x, tokens, text_mask), h)
    h = _block(net.mid2, [h], emb)
    for i in reversed(range(net.levels)):
        inputs = [h, skips[i]]
        for block in net.up_blocks[i]:
            h = _block(block, inputs, emb)
            inputs = [h]
        sampler = net.up_samplers[i]
        if not isinstance(sampler, nn.Identity):
            h = _UpConv(sampler.conv, h)
    return _Conv(net.conv_out, [h], pre=lambda x: F.silu(net.norm_out(x), inplace=True))

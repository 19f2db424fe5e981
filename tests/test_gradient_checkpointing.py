"""`gradient_checkpointing` (every diffusion stage's config): the blocks are recomputed in backward, and
nothing else changes: the loss, every gradient and eval-mode sampling equal the stored-activation ones."""
from __future__ import annotations

import pytest
import torch

from bundle_helpers import small_batch
from cascade.registry import get_stage

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout on, so the recomputation must replay the forward's dropout masks to give the same gradients.
SMALL = {
    "prior": dict(embed_dim=8, token_dim=8, max_text_len=4, width=16, depth=2, heads=2, dropout=0.1),
    "decoder": dict(image_size=32, clip_dim=8, text_dim=8, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[8], head_dim=16, patch_size=2, text_layers=1, dropout=0.1),
    "sr256": dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1], text=True, text_dim=8, head_dim=8,
                  dropout=0.1),
}


def _blocks(name: str, stage) -> list[torch.nn.Module]:
    """Blocks the option recomputes: a U-Net level or res block, an attention block, a transformer block."""
    if name == "prior":
        return [stage.net.blocks[0], stage.net.blocks[1]]
    if name == "decoder":
        return [stage.unet.down[0], stage.unet.mid[0], stage.unet.up[-1], stage.conditioning.text_blocks[0]]
    return [stage.net.down_blocks[0][0], stage.net.mid1, stage.net.cross_attn, stage.net.up_blocks[0][0]]


def _conditioning(name: str, b: int = 2) -> dict[str, torch.Tensor]:
    batch = small_batch(name, b)
    if name == "prior":
        return {k: batch[k] for k in ("clip_text", "clip_tokens", "clip_mask")}
    if name == "decoder":
        return {k: batch[k] for k in ("clip_image", "clip_tokens", "clip_mask")}
    return {"low_res": batch["sr_low"], "clip_tokens": batch["clip_tokens"], "clip_mask": batch["clip_mask"]}


def _pair(name: str):
    """The stage without and with checkpointing, holding the same weights."""
    cls = get_stage(name)
    torch.manual_seed(0)
    plain = cls(cls.Config(**SMALL[name], steps=2))
    with torch.no_grad():  # off the zero-initialised output layers, so every gradient is non-zero
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    recomputing = cls(cls.Config(**SMALL[name], steps=2, gradient_checkpointing=True))
    recomputing.load_state_dict(plain.state_dict())
    return plain, recomputing


def _count_calls(blocks: list[torch.nn.Module]) -> list[int]:
    """Calls of each block, counted as they start: the recomputation stops early (after the last op
    whose saved tensors backward needs), so a forward hook would miss it."""
    counts = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("name", ["prior", "decoder", "sr256"])
def test_checkpointing_recomputes_the_blocks_and_gives_the_same_loss_and_gradients(name):
    plain, recomputing = _pair(name)
    batch = small_batch(name)
    results = []
    for stage in (plain, recomputing):
        stage.train()
        counts = _count_calls(_blocks(name, stage))
        torch.manual_seed(1)
        loss = stage.loss(batch)
        forward_calls = list(counts)
        loss.backward()
        after = torch.rand(())  # the recomputation leaves the global RNG where the forward left it
        results.append((loss.detach(), {n: p.grad for n, p in stage.named_parameters()}, forward_calls, counts, after))
    (loss, grads, fwd, total, after), (loss_ck, grads_ck, fwd_ck, total_ck, after_ck) = results
    assert fwd == fwd_ck == [1] * len(fwd) and total == fwd  # each block runs once in the forward
    assert total_ck == [2] * len(total_ck)  # ... and once more in the backward when recomputed
    torch.testing.assert_close(loss_ck, loss)
    assert torch.equal(after_ck, after)
    assert grads.keys() == grads_ck.keys()
    for key, grad in grads.items():
        assert (grad is None) == (grads_ck[key] is None), key
        if grad is not None:
            torch.testing.assert_close(grads_ck[key], grad, msg=key)
    assert sum(int(g is not None and g.abs().sum() > 0) for g in grads.values()) > 0.9 * len(grads)


@pytest.mark.parametrize("name", ["prior", "decoder", "sr256"])
def test_eval_mode_sampling_is_unaffected_and_recomputes_nothing(name):
    plain, recomputing = _pair(name)
    out = plain.eval().sample(_conditioning(name), generator=torch.Generator().manual_seed(0))
    out_ck = recomputing.eval().sample(_conditioning(name), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out_ck, out)
    # Without autograd (the decoder's self-conditioning estimate runs so in training) nothing is
    # stored, so nothing is checkpointed either, in training mode too.
    recomputing.train()
    counts = _count_calls(_blocks(name, recomputing))
    with torch.no_grad():
        torch.manual_seed(1)
        recomputing.loss(small_batch(name))
    assert counts == [1] * len(counts)

"""The contract the diffusion stages share (`cascade.stage.DiffusionConfig`): one name for each diffusion
setting, old names mapped, and the config's sampling defaults are what `Stage.sample` uses."""
from __future__ import annotations

import pytest
import torch

import decoder.stage
import prior.stage
import superres.stage
from cascade.config import parse_config
from cascade.registry import SAMPLED_STAGES, get_stage
from cascade.stage import DiffusionConfig

SMALL = {
    "prior": dict(embed_dim=8, token_dim=8, max_text_len=4, width=16, depth=1, heads=2),
    "decoder": dict(clip_dim=8, text_dim=8, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[32], head_dim=16),
    "sr256": dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1], text=True, text_dim=8, head_dim=8),
    "sr1024": dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1], train_crop=64, tile_size=256),
}
SAMPLE_FN = {"prior": (prior.stage, "diffusion_sample"), "decoder": (decoder.stage.diffusion, "sample"),
             "sr256": (superres.stage, "sample")}


def _conditioning(name: str, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = {"clip_tokens": torch.randn(b, 4, 8, generator=g), "clip_mask": torch.ones(b, 4, dtype=torch.bool)}
    if name == "prior":
        return {"clip_text": torch.randn(b, 8, generator=g), **text}
    if name == "decoder":
        return {"clip_image": torch.nn.functional.normalize(torch.randn(b, 8, generator=g), dim=-1), **text}
    return {"low_res": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, **text}


@pytest.mark.parametrize("name", SAMPLED_STAGES)
def test_every_diffusion_stage_configures_its_diffusion_with_the_same_names(name):
    config = get_stage(name).Config()
    assert isinstance(config, DiffusionConfig)
    for key in ("schedule", "timesteps", "prediction", "snr_gamma", "p_drop_text", "sampler", "steps", "guidance",
                "t_min"):
        assert key in type(config).model_fields, key


@pytest.mark.parametrize("name,old,new", [
    ("prior", "cond_drop_prob", "p_drop_text"), ("sr256", "p_uncond", "p_drop_text"),
    ("sr1024", "sample_steps", "steps"), ("decoder", "sample_steps", "steps"),
    ("decoder", "preview_guidance", "guidance"),
])
def test_old_key_names_still_load(name, old, new):
    value = {"p_drop_text": 0.25, "steps": 7, "guidance": 2.5}[new]
    with pytest.warns(FutureWarning, match=f"x.yaml: '{old}' is now called '{new}'"):
        config = parse_config(get_stage(name).Config, {old: value}, "x.yaml")
    assert getattr(config, new) == value


@pytest.mark.parametrize("name", ["prior", "decoder", "sr256"])
def test_the_configs_sampling_defaults_reach_sample(name, monkeypatch):
    """sample() without sampler, steps or guidance runs the config's: what the diffusion core is asked
    for, and one callback per step; the config's t_min always."""
    cls = get_stage(name)
    torch.manual_seed(0)
    stage = cls(cls.Config(**SMALL[name], sampler="ddpm", steps=3, guidance=2.5, t_min=40)).eval()
    module, attr = SAMPLE_FN[name]
    real, asked = getattr(module, attr), []
    monkeypatch.setattr(module, attr, lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    steps = []
    stage.sample(_conditioning(name), generator=torch.Generator().manual_seed(0), callback=steps.append)
    assert (asked[0]["sampler"], asked[0]["steps"], asked[0]["guidance"], asked[0]["t_min"]) == ("ddpm", 3, 2.5, 40)
    assert len(steps) == 3
    # Given values win over the config's.
    asked.clear()
    stage.sample(_conditioning(name), sampler="ddim", steps=2, guidance=1.0, generator=torch.Generator())
    assert (asked[0]["sampler"], asked[0]["steps"]) == ("ddim", 2) and asked[0]["guidance"] in (1.0, None)
    assert asked[0]["t_min"] == 40


def test_the_sr_loss_is_the_diffusion_loss_with_min_snr_weighting(monkeypatch):
    from cascade import diffusion

    torch.manual_seed(0)
    stage = get_stage("sr256")(get_stage("sr256").Config(**{**SMALL["sr256"], "text": False}))
    high = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = {"image_64": torch.nn.functional.avg_pool2d(high, 4), "image_256": torch.nn.functional.interpolate(
        high, size=256)}
    calls = []
    monkeypatch.setattr(superres.stage, "diffusion_loss",
                        lambda *a, **kw: calls.append(kw) or diffusion.diffusion_loss(*a, **kw))
    torch.manual_seed(1)
    plain = stage.loss(batch)
    stage.config.snr_gamma = 5.0
    torch.manual_seed(1)
    weighted = stage.loss(batch)
    assert [c["snr_gamma"] for c in calls] == [None, 5.0]
    assert not torch.allclose(plain, weighted)  # the same draws, weighted otherwise


def _training_batch(name: str, b: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    batch = _conditioning(name, b)
    if name == "prior":
        batch["clip_image"] = torch.nn.functional.normalize(torch.randn(b, 8, generator=g), dim=-1)
    elif name == "decoder":
        batch["image_64"] = torch.rand(b, 3, 64, 64, generator=g) * 2 - 1
    else:  # aligned crops, as preprocess cuts them
        batch["sr_high"] = torch.rand(b, 3, 64, 64, generator=g) * 2 - 1
        batch["sr_low"] = torch.nn.functional.avg_pool2d(batch["sr_high"], 4)
    return batch


@pytest.mark.parametrize("name", SAMPLED_STAGES)
def test_a_stage_with_bf16_weights_trains_and_samples_from_fp32_data(name):
    """Mixed precision (DeepSpeed's bf16 casts the weights; the data stay fp32): the loss and sample run,
    gradients reach the bf16 weights, the diffusion maths stay fp32, and the loss matches fp32's."""
    cls = get_stage(name)
    torch.manual_seed(0)
    full = cls(cls.Config(**SMALL[name], steps=2))
    half = cls(cls.Config(**SMALL[name], steps=2))
    half.load_state_dict(full.state_dict())
    half.to(torch.bfloat16)
    batch = _training_batch(name)
    torch.manual_seed(1)
    loss_full = full.loss(batch)
    torch.manual_seed(1)
    loss_half = half.loss(batch)
    loss_half.backward()
    assert loss_half.dtype == torch.float32 and torch.isfinite(loss_half)
    assert loss_half.item() == pytest.approx(loss_full.item(), rel=0.05)
    grads = [p.grad for p in half.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 for g in grads)
    cond = _conditioning(name, 1)
    out = half.eval().sample(cond, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

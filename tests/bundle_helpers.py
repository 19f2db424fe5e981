"""Builders of small, untrained stages for the tests that save them into bundles (it holds no tests)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cascade.registry import get_stage


def seeded_stage(name: str, **model):
    """The registered stage `name` with config `model`, its weights drawn after torch.manual_seed(0)."""
    cls = get_stage(name)
    torch.manual_seed(0)
    return cls(cls.Config(**model))


# The small bundle's stages: each config carries its sampling defaults (small, so the tests are fast).
CONFIG_STEPS = {"prior": 2, "decoder": 4, "sr256": 3, "sr1024": 1}
DECODER = dict(clip_dim=32, text_dim=384, channels=16, channel_mult=[1, 2], num_res_blocks=1,
               attention_resolutions=[16], head_dim=8, patch_size=2)
SR = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1])


def small_bundle(root: Path) -> Path:
    """A bundle of small untrained stages (clip, prior, decoder, sr256, sr1024) written to `root`."""
    from cascade.bundle import save_stage, write_manifest

    save_stage(seeded_stage("clip", embed_dim=32, head="linear", image_size=64, max_text_len=16), root / "clip")
    save_stage(seeded_stage("prior", embed_dim=32, token_dim=384, max_text_len=16, width=32, depth=1, heads=2,
                            steps=CONFIG_STEPS["prior"]), root / "prior")
    save_stage(seeded_stage("decoder", **DECODER, steps=CONFIG_STEPS["decoder"]), root / "decoder")
    save_stage(seeded_stage("sr256", **SR, steps=CONFIG_STEPS["sr256"]), root / "sr256")
    save_stage(seeded_stage("sr1024", **SR, train_crop=64, tile_size=256, stream_rows=32, steps=CONFIG_STEPS["sr1024"]),
               root / "sr1024")
    write_manifest(root)
    return root


def small_batch(name: str, b: int = 3) -> dict[str, torch.Tensor]:
    """A training batch for the small prior, decoder (32x32) or sr256 configs of the compile and
    gradient-checkpointing tests: 8-d CLIP embeddings, 4 tokens of 8 (the last one padding)."""
    g = torch.Generator().manual_seed(3)
    text = {"clip_tokens": torch.randn(b, 4, 8, generator=g), "clip_mask": torch.arange(4).expand(b, 4) < 3}
    if name == "prior":
        return {"clip_text": F.normalize(torch.randn(b, 8, generator=g), dim=-1),
                "clip_image": F.normalize(torch.randn(b, 8, generator=g), dim=-1), **text}
    if name == "decoder":
        return {"clip_image": F.normalize(torch.randn(b, 8, generator=g), dim=-1),
                "image_32": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, **text}
    high = torch.rand(b, 3, 64, 64, generator=g) * 2 - 1
    return {"sr_high": high, "sr_low": F.avg_pool2d(high, 4), **text}


def write_embedded_shards(out: Path, *, train: int, val: int, d: int = 16, dt: int = 12, length: int = 6) -> Path:
    """Shapes samples with random unit 'CLIP' embeddings (D = d) and token states (L = length, Dt = dt; the
    first 4 unmasked) in the embed step's layout (`prior.synthetic.write_scene_shards`)."""
    from prior.synthetic import write_scene_shards

    return write_scene_shards(out, train=train, val=val, clip_dim=d, text_dim=dt, text_len=length, visible=4)

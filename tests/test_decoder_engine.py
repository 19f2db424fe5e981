"""The decoder through the training engine: shards with 64.png and CLIP embeddings -> train -> export ->
cascade.bundle.load_stage -> the same images from the same noise."""
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bundle_helpers import write_embedded_shards


@pytest.mark.slow
def test_train_export_load_sample(tmp_path):
    from cascade.bundle import load_stage
    from cascade.training.engine import TrainArgs, train

    data = write_embedded_shards(tmp_path / "data", train=16, val=4)
    config = tmp_path / "decoder.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "decoder",
        "model": dict(clip_dim=16, text_dim=12, channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                      attention_resolutions=[8], head_dim=16, patch_size=2, steps=2, eval_samples=4),
        "train": dict(batch_size=4, lr=1e-3, warmup_steps=1, max_steps=3, log_every=1, ckpt_every=0,
                      sample_every=0, eval_every=0, ema_decay=0.5, seed=0)}))
    result = train(TrainArgs(stage="decoder", config=config, data=data, run_dir=tmp_path / "run",
                             export=tmp_path / "bundle"))
    assert result.step == 3
    stage = load_stage(result.export_dir)
    # The bundle holds the run's EMA weights exactly (with ema_decay 0.5 they are not the raw weights).
    last = tmp_path / "run" / "checkpoints" / "step-000003"
    ema, raw = load_file(str(last / "ema.safetensors")), load_file(str(last / "weights.safetensors"))
    weights = stage.state_dict()
    assert set(ema) <= set(weights) and any(name.startswith("unet.") for name in ema)
    for name, value in ema.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
    assert any(not torch.equal(raw[name], value) for name, value in ema.items() if name in raw)
    g = torch.Generator().manual_seed(0)
    cond = {"clip_image": torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)}
    noise = torch.randn(1, 3, 64, 64, generator=g)  # the same x_T for both rows
    a = stage.sample(cond, steps=3, guidance=3.0, noise=noise)
    assert a.shape == (2, 3, 64, 64) and torch.equal(stage.sample(cond, steps=3, guidance=3.0, noise=noise), a)
    assert torch.equal(load_stage(result.export_dir).sample(cond, steps=3, guidance=3.0, noise=noise), a)


@pytest.mark.slow
def test_init_from_fine_tunes_an_exported_decoder_into_an_inpainting_one(tmp_path):
    """train_stage.py --init-from: a fresh inpainting run starts from an exported plain decoder (its new
    stem channels zero); resuming that run ignores --init-from; a stage of another kind is refused."""
    from cascade.bundle import load_stage
    from cascade.errors import UserError
    from cascade.training.engine import TrainArgs, train

    data = write_embedded_shards(tmp_path / "data", train=16, val=4)
    model = dict(clip_dim=16, text_dim=12, channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                 attention_resolutions=[8], head_dim=16, patch_size=2, steps=2, eval_samples=4)
    run = dict(batch_size=4, warmup_steps=1, log_every=1, ckpt_every=0, sample_every=0, eval_every=0,
               ema_decay=0.5, seed=0)
    plain, inpaint = tmp_path / "plain.yaml", tmp_path / "inpaint.yaml"
    plain.write_text(yaml.safe_dump({"stage": "decoder", "model": model, "train": dict(run, lr=1e-3, max_steps=2)}))
    inpaint.write_text(yaml.safe_dump({"stage": "decoder", "model": dict(model, inpaint=True),
                                       "train": dict(run, lr=1e-9, max_steps=1)}))
    source = train(TrainArgs(stage="decoder", config=plain, data=data, run_dir=tmp_path / "plain",
                             export=tmp_path / "bundle")).export_dir
    result = train(TrainArgs(stage="decoder", config=inpaint, data=data, run_dir=tmp_path / "inpaint",
                             export=tmp_path / "bundle2", init_from=source))
    before, after = load_stage(source).state_dict(), load_stage(result.export_dir).state_dict()
    stem = after["unet.stem.weight"]
    assert stem.shape[1] == before["unet.stem.weight"].shape[1] + 16  # 4 channels folded by the 2x2 patch
    assert stem[:, 12:].abs().max() < 1e-6  # the new channels start at zero (lr 1e-9: barely moved)
    torch.testing.assert_close(stem[:, :12], before["unet.stem.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["unet.out.weight"], before["unet.out.weight"], rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="holds a decoder stage, not a prior"):
        train(TrainArgs(stage="prior", config=Path(__file__).parents[1] / "configs/tiny/prior.yaml", data=data, run_dir=tmp_path / "p",
                        init_from=source))

"""Model bundle stage folders: save -> load gives identical outputs; every mismatch is a one-line UserError."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade.bundle import FORMAT_VERSION, load_stage, read_stage_config, save_stage, write_manifest
from cascade.errors import UserError
from cascade.registry import register_stage
from training_helpers import TinyAE, TinyAEConfig


def _stage(width=8, seed=0):
    torch.manual_seed(seed)
    stage = TinyAE(TinyAEConfig(width=width))
    with torch.no_grad():
        stage.gain.fill_(1.5)
    return stage


def test_save_load_gives_identical_outputs_in_eval_mode(tmp_path):
    stage = _stage().train()
    path = save_stage(stage, tmp_path / "b" / "test_tiny_ae")
    loaded = load_stage(path)
    assert not loaded.training and isinstance(loaded, TinyAE) and loaded.config == stage.config
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert torch.equal(stage(x), loaded(x))
    for name, value in stage.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    config = read_stage_config(path)
    assert config["stage"] == "test_tiny_ae" and config["config"] == {"width": 8}
    assert config["format_version"] == FORMAT_VERSION and "cascade_version" in config
    assert not list(path.parent.glob(".*"))  # no temporary left behind


def test_export_replaces_an_older_one(tmp_path):
    save_stage(_stage(seed=0), tmp_path / "s")
    newer = _stage(seed=1)
    save_stage(newer, tmp_path / "s")
    assert torch.equal(load_stage(tmp_path / "s").decode.weight, newer.decode.weight)


def test_every_file_of_an_export_follows_the_umask(tmp_path):
    """safetensors writes 0600; the weights get the mode every other file gets, 0666 less the umask."""
    old = os.umask(0o027)
    try:
        path = save_stage(_stage(), tmp_path / "b" / "test_tiny_ae")
        write_manifest(tmp_path / "b")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert modes == {"model.safetensors": 0o640, "config.json": 0o640, "cascade.json": 0o640}
    assert stat.S_IMODE(path.stat().st_mode) == 0o750


@register_stage("test_tied_ae")
class TiedAE(TinyAE):
    """Two names for one module, as with tied input/output embeddings."""

    def __init__(self, config):
        super().__init__(config)
        self.alias = self.frozen


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    torch.manual_seed(0)
    stage = TiedAE(TinyAEConfig())
    path = save_stage(stage, tmp_path / "test_tied_ae")
    assert len(load_file(str(path / "model.safetensors"))) == len(stage.state_dict()) - 2
    loaded = load_stage(path)
    assert loaded.alias.weight is loaded.frozen.weight
    assert torch.equal(loaded.frozen.weight, stage.frozen.weight)


def test_mismatches_are_one_line_user_errors(tmp_path):
    path = save_stage(_stage(), tmp_path / "s")

    def error(match):
        with pytest.raises(UserError, match=match) as err:
            load_stage(path)
        assert "\n" not in str(err.value)

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    error("format version 99")
    (path / "config.json").write_text(json.dumps({**config, "config": {"width": 8, "depth": 3}}))
    error("unknown key 'depth'")
    (path / "config.json").write_text(json.dumps({**config, "config": {"width": 4}}))
    error("does not match its config: .*has shape")
    (path / "config.json").write_text(json.dumps({**config, "stage": "no_such_stage"}))
    error("unknown stage 'no_such_stage'")
    (path / "config.json").write_text(json.dumps(config))
    weights = load_file(str(path / "model.safetensors"))
    del weights["decode.bias"]
    save_file(weights, str(path / "model.safetensors"))
    error("missing decode.bias")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    error("not a readable safetensors file")
    (path / "model.safetensors").unlink()
    error("has no model.safetensors")
    (path / "config.json").write_text("{")
    error("corrupt")
    (path / "config.json").unlink()
    error("has no config.json")
    with pytest.raises(UserError, match="not found"):
        load_stage(tmp_path / "nowhere")


def test_manifest_lists_the_stage_folders_present(tmp_path):
    bundle = tmp_path / "bundle"
    save_stage(_stage(), bundle / "test_tiny_ae")
    (bundle / "notes").mkdir()  # not a stage folder: ignored
    manifest = write_manifest(bundle)
    on_disk = json.loads((bundle / "cascade.json").read_text())
    assert on_disk == manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["stages"] == ["test_tiny_ae"]
    assert manifest["details"]["test_tiny_ae"]["image_sizes"] == [64]
    with pytest.raises(UserError, match="no stage folders"):
        write_manifest(bundle / "notes")
    with pytest.raises(UserError, match="not found"):
        write_manifest(tmp_path / "nowhere")
    (bundle / "test_tiny_ae").rename(bundle / "other")
    with pytest.raises(UserError, match="folder is named 'other'"):
        write_manifest(bundle)


def test_manifest_records_each_stage_data_needs_from_its_config(tmp_path):
    import decoder  # noqa: F401  (registers the stage)
    import superres  # noqa: F401
    from cascade.registry import get_stage

    def build(name, **model):
        cls = get_stage(name)
        torch.manual_seed(0)
        return cls(cls.Config(**model))

    bundle = tmp_path / "bundle"
    sr = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1])
    text_sr = build("sr256", **sr, text=True, text_dim=12, head_dim=8)
    plain_sr = build("sr1024", **sr, train_crop=64)
    dec = build("decoder", clip_dim=8, text_dim=8, image_size=32, channels=8, channel_mult=[1, 2],
                num_res_blocks=1, attention_resolutions=[], head_dim=8)
    for stage in (text_sr, plain_sr, dec):
        save_stage(stage, bundle / stage.name)
    details = write_manifest(bundle)["details"]
    assert details["sr256"] == {**details["sr256"], "image_sizes": [64, 256], "needs_embeddings": True}
    assert details["sr1024"] == {**details["sr1024"], "image_sizes": [256, 1024], "needs_embeddings": False}
    assert details["decoder"] == {**details["decoder"], "image_sizes": [32], "needs_embeddings": True}
    # the instances answer the same as the manifest
    for stage in (text_sr, plain_sr, dec):
        assert [list(stage.image_sizes), stage.needs_embeddings] == [details[stage.name]["image_sizes"],
                                                                    details[stage.name]["needs_embeddings"]]


def _as_format_1(path, **old_keys) -> None:
    """Rewrite a saved stage folder as format 1 wrote it: its config under the old key names."""
    data = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in data["config"].items() if k not in ("steps", "guidance", "eval_steps", "eval_guidance",
                                                                   "p_drop_text")}
    (path / "config.json").write_text(json.dumps({**data, "format_version": 1, "config": {**config, **old_keys}}))


def test_format_1_stages_load_with_the_sampling_the_format_1_pipeline_used(tmp_path, recwarn):
    from cascade.bundle import V1_SAMPLING
    from decoder import Decoder, DecoderConfig
    from prior import PriorConfig, PriorStage
    from superres import SR256, SRConfig

    small = dict(channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[32], head_dim=16,
                 clip_dim=8, text_dim=8)
    prior = save_stage(PriorStage(PriorConfig(embed_dim=8, token_dim=8, max_text_len=4, width=16, depth=1,
                                              heads=2)), tmp_path / "prior")
    decoder = save_stage(Decoder(DecoderConfig(**small)), tmp_path / "decoder")
    sr = save_stage(SR256(SRConfig(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1])), tmp_path / "sr256")
    # What these stages' config.json said in format 1 (tiny configs and the quick demo's decoder).
    _as_format_1(prior, cond_drop_prob=0.2, sample_steps=32, guidance=1.0)
    _as_format_1(decoder, sample_steps=25, preview_guidance=3.0, p_drop_text=0.1)
    _as_format_1(sr, steps=25, p_uncond=0.3)

    p, d, s = (load_stage(path).config for path in (prior, decoder, sr))
    assert (p.sampler, p.steps, p.guidance) == ("ddim", 25, 4.0) == tuple(V1_SAMPLING["prior"].values())
    assert (p.eval_steps, p.eval_guidance, p.p_drop_text) == (32, 1.0, 0.2)  # the old evaluation settings
    assert (d.steps, d.guidance, d.p_drop_text) == (50, 3.0, 0.1)
    assert (s.steps, s.guidance, s.p_drop_text) == (20, 1.0, 0.3)
    assert not [w for w in recwarn if "now called" in str(w.message)]  # a bundle's old keys are not the user's
    write_manifest(tmp_path)  # a format-1 folder beside format-2 ones: the manifest reads it too
    assert json.loads((tmp_path / "cascade.json").read_text())["format_version"] == FORMAT_VERSION


def test_renamed_keys_in_a_config_file_load_with_a_warning_naming_the_file(tmp_path):
    from cascade.config import DeprecatedKeyWarning, load_config
    from cascade.errors import ConfigError
    from decoder import DecoderConfig

    path = tmp_path / "decoder.yaml"
    path.write_text("sample_steps: 30\npreview_guidance: 2.5\n")
    with pytest.warns(DeprecatedKeyWarning, match=r"decoder\.yaml: 'sample_steps' is now called 'steps'"):
        config = load_config(DecoderConfig, path)
    assert (config.steps, config.guidance) == (30, 2.5)
    path.write_text("sample_steps: 30\nsteps: 40\n")
    with pytest.raises(ConfigError, match="give only 'steps'"):
        load_config(DecoderConfig, path)

"""benchmarks/decoder_learning.py end to end on a small embedded shapes set: it trains, evaluates the
exported decoder and reports the scorer's ceiling on the real val images beside the decoded scores; and
benchmarks/decoder_sampling.py's sweep of sampling settings over one exported decoder."""
import json

import pytest
import torch
import yaml

from bundle_helpers import write_embedded_shards


@pytest.mark.slow
def test_decoder_learning_reports_scores_beside_the_real_images_ceiling(tmp_path, capsys, monkeypatch):
    import decoder.evaluation
    from benchmarks.decoder_learning import main

    scored = []  # how many images each decoded-score call judged
    score_decodes = decoder.evaluation.score_decodes
    monkeypatch.setattr(decoder.evaluation, "score_decodes",
                        lambda images, *a, **k: scored.append(len(images)) or score_decodes(images, *a, **k))

    data = write_embedded_shards(tmp_path / "data", train=16, val=6)
    config = tmp_path / "decoder.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "decoder",
        "model": dict(clip_dim=16, text_dim=12, channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                      attention_resolutions=[8], head_dim=16, patch_size=2, steps=2, eval_guidance=[1.0],
                      coord_channels=True, eval_samples=2),  # --eval-samples, not this, sizes the benchmark's eval
        "train": dict(batch_size=4, lr=1e-3, warmup_steps=1, max_steps=50, log_every=1, ckpt_every=0,
                      sample_every=0, eval_every=0, ema_decay=0.5, seed=0)}))
    main(["--data", str(data), "--steps", "2", "--config", str(config), "--run-dir", str(tmp_path / "run"),
          "--eval-samples", "6"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["steps"] == 2 and record["samples_seen"] == 8 and record["eval_scenes"] == 6
    # The scorer finds (nearly) every object of the renderer's own images: the ceiling the decoded scores sit under.
    assert record["real_images"]["colour_acc"] == 1.0 and record["real_images"]["shape_acc"] > 0.8
    assert set(record["decoded"]) == {"colour_acc@g1", "shape_acc@g1", "position_acc@g1", "position_stated_acc@g1",
                                      "shape_single_acc@g1", "colour_single_acc@g1", "position_single_acc@g1",
                                      "count_acc@g1", "too_many@g1", "fd_effnet@g1"}
    assert record["real_images"]["count_acc"] == 1.0
    assert record["decoded"]["fd_effnet@g1"] > 0  # two steps of training draw noise, not scenes
    assert record["config"]["coord_channels"] is True
    assert set(record["layout_given"]) == {"from_0.5@g3", "from_0.7@g3"}
    assert all(0 <= v <= 1 for m in record["layout_given"].values() for v in m.values())
    assert (tmp_path / "run" / "bundle" / "decoder" / "model.safetensors").is_file()
    assert record["steps_timed"] == 2 and record["s_per_step"] > 0 and scored == [6]

    # The finished run dir scored again on fewer scenes: no training, and not refused as another config.
    main(["--data", str(data), "--steps", "2", "--config", str(config), "--run-dir", str(tmp_path / "run"),
          "--eval-samples", "3"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["steps"] == 2 and again["steps_timed"] == 0 and again["s_per_step"] is None
    assert again["eval_scenes"] == 3 and scored == [6, 3]


def _tiny_decoder(tmp_path):
    from cascade.bundle import save_stage
    from cascade.registry import get_stage

    cls = get_stage("decoder")
    torch.manual_seed(0)
    stage = cls(cls.Config(clip_dim=16, text_dim=12, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                           attention_resolutions=[16], head_dim=16, patch_size=2))
    return save_stage(stage.eval(), tmp_path / "bundle" / "decoder"), stage.eval()


def test_decoder_sampling_sweeps_settings_on_the_same_scenes(tmp_path, capsys):
    from benchmarks.decoder_sampling import main

    data = write_embedded_shards(tmp_path / "data", train=0, val=5)
    path, _ = _tiny_decoder(tmp_path)
    main(["--decoder", str(path), "--data", str(data), "--eval-samples", "5",
          "--setting", "ddpm:2:1", "--setting", "ddim:3:2:0.5"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["eval_scenes"] == 5
    rows = record["settings"]
    assert [(r["sampler"], r["steps"], r["guidance"], r["eta"]) for r in rows] == [("ddpm", 2, 1.0, 0.0),
                                                                                   ("ddim", 3, 2.0, 0.5)]
    for r in rows:
        assert r["s_per_image"] > 0
        assert all(0 <= r[k] <= 1 for k in ("colour_acc", "shape_acc", "position_acc", "count_acc", "too_many"))
    assert record["real_images"]["colour_acc"] == 1.0 and record["real_images"]["count_acc"] == 1.0


def test_decode_all_takes_a_sweep_setting_and_a_seeded_generator(tmp_path):
    from decoder.evaluation import decode_all

    _, decoder = _tiny_decoder(tmp_path)
    g = torch.Generator().manual_seed(0)
    conditioning = {"clip_image": torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=-1),
                    "clip_tokens": torch.randn(3, 6, 12, generator=g), "clip_mask": torch.ones(3, 6, dtype=torch.bool)}
    noise = torch.randn(3, 3, 64, 64, generator=g)

    def ddpm(seed):
        return decode_all(decoder, conditioning, noise, 3.0, chunk=2, sampler="ddpm", steps=2,
                          generator=torch.Generator().manual_seed(seed))

    # a stochastic sampler repeats itself from the same seed, and not from another
    torch.testing.assert_close(ddpm(1), ddpm(1))
    assert not torch.allclose(ddpm(1), ddpm(2))
    # the deterministic sampler, chunked, is the stage's own sampling of that noise
    torch.testing.assert_close(decode_all(decoder, conditioning, noise, 3.0, chunk=2, sampler="ddim", steps=2, eta=0.0),
                               decoder.sample(conditioning, sampler="ddim", steps=2, guidance=3.0, noise=noise,
                                              threshold=decoder.config.threshold))


@pytest.mark.parametrize("bad", ["ddim:50", "euler:50:3", "ddim:0:3", "ddim:50:-1", "ddim:x:3", "ddim:50:3:1:2"])
def test_decoder_sampling_rejects_a_malformed_setting_in_one_line(bad, capsys):
    from benchmarks.decoder_sampling import main

    with pytest.raises(SystemExit) as exc:
        main(["--decoder", "x", "--data", "y", "--setting", bad])
    assert exc.value.code == 2
    assert "SAMPLER:STEPS:GUIDANCE[:ETA]" in capsys.readouterr().err

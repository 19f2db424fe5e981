"""benchmarks/decoder_learning.py end to end on a small embedded shapes set: it trains, evaluates the
exported decoder and reports the scorer's ceiling on the real val images beside the decoded scores."""
import json

import pytest
import yaml

from tests.test_decoder_engine import write_embedded_shards


@pytest.mark.slow
def test_decoder_learning_reports_scores_beside_the_real_images_ceiling(tmp_path, capsys):
    from benchmarks.decoder_learning import main

    data = write_embedded_shards(tmp_path / "data", train=16, val=6)
    config = tmp_path / "decoder.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "decoder",
        "model": dict(clip_dim=16, text_dim=12, channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                      attention_resolutions=[8], head_dim=16, patch_size=2, sample_steps=2, eval_guidance=[1.0],
                      coord_channels=True),
        "train": dict(batch_size=4, lr=1e-3, warmup_steps=1, max_steps=50, log_every=1, ckpt_every=0,
                      sample_every=0, eval_every=0, ema_decay=0.5, seed=0)}))
    main(["--data", str(data), "--steps", "2", "--config", str(config), "--run-dir", str(tmp_path / "run"),
          "--eval-samples", "6"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["steps"] == 2 and record["samples_seen"] == 8 and record["eval_scenes"] == 6
    # The scorer finds (nearly) every object of the renderer's own images: the ceiling the decoded scores sit under.
    assert record["real_images"]["colour_acc"] == 1.0 and record["real_images"]["shape_acc"] > 0.8
    assert set(record["decoded"]) == {"colour_acc@g1", "shape_acc@g1", "position_acc@g1", "position_stated_acc@g1",
                                      "count_acc@g1", "too_many@g1", "fd_effnet@g1"}
    assert record["real_images"]["count_acc"] == 1.0
    assert record["decoded"]["fd_effnet@g1"] > 0  # two steps of training draw noise, not scenes
    assert record["config"]["coord_channels"] is True
    assert set(record["layout_given"]) == {"from_0.5@g3", "from_0.7@g3"}
    assert all(0 <= v <= 1 for m in record["layout_given"].values() for v in m.values())
    assert (tmp_path / "run" / "bundle" / "decoder" / "model.safetensors").is_file()

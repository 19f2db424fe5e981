"""The CLIP score in `cascade eval`: generated and real val images against their captions, under the
bundle's CLIP and under any open_clip model given as a local weights file."""
import json

import pytest
import torch

from bundle_helpers import small_bundle, write_embedded_shards
from cascade.encoders import load_encoder


def test_clip_score_is_the_mean_cosine_of_image_and_caption_embeddings(tmp_path):
    from cascade.evaluation import clip_score

    clip = load_encoder(small_bundle(tmp_path / "b") / "clip")
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = ["a red circle", "a blue square", "a green star", "a pink heart", "a black cross"]
    expected = (clip.encode_image(images) * clip.encode_text(captions)[0]).sum(-1).mean().item()
    assert clip_score(clip, images, captions, batch=2) == pytest.approx(expected, abs=1e-5)
    assert -1.0 <= expected <= 1.0


@pytest.fixture
def tiny_open_clip_file(tmp_path):
    """A tiny ViT config registered with open_clip and its random weights saved to a local file."""
    from cascade.encoders.clip_model import _open_clip

    config = tmp_path / "cascade-score-tiny.json"
    config.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
    }))
    _open_clip().add_model_config(config)
    weights = tmp_path / "tiny.pt"
    torch.save(load_encoder("cascade-score-tiny").model.state_dict(), weights)
    return f"cascade-score-tiny:{weights}"


def test_eval_reports_clip_scores_of_generated_and_real_images(tmp_path, tiny_open_clip_file):
    from cascade.evaluation import evaluate_bundle

    bundle = small_bundle(tmp_path / "bundle")
    data = write_embedded_shards(tmp_path / "data", train=4, val=6, d=32, dt=384, length=16)
    results = evaluate_bundle(bundle, data, tmp_path / "eval", stages=["prior", "decoder"], limit=6, one_object=0,
                              clip_models=(tiny_open_clip_file,))
    cascade = results["cascade"]
    for name in ("bundle", "cascade-score-tiny"):
        assert -1 <= cascade[f"clip_score_{name}_real"] <= 1
        for w in (1, 3):
            assert -1 <= cascade[f"clip_score_{name}@prior_g{w}"] <= 1
    assert cascade["clip_score_bundle_real"] != cascade["clip_score_bundle@prior_g3"]
    assert "clip_score_bundle@prior_g3" in (tmp_path / "eval" / "eval.md").read_text()


@pytest.mark.parametrize("spec,needle", [("ViT-B-32", "NAME:WEIGHTS_FILE"),
                                         ("ViT-B-32:/no/such/file.pt", "no weights file at /no/such/file.pt")])
def test_a_bad_clip_score_model_is_a_one_line_error_before_anything_runs(spec, needle, tmp_path, capsys):
    from cascade.cli import main

    bundle = small_bundle(tmp_path / "bundle")
    data = write_embedded_shards(tmp_path / "data", train=2, val=2, d=32, dt=384, length=16)
    assert main(["eval", "--model", str(bundle), "--data", str(data), "--out", str(tmp_path / "eval"),
                 "--clip-score-model", spec]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not (tmp_path / "eval").exists()

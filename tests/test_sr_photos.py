"""The SR evaluation on held-out photographs (`superres.photos`, `cascade eval --photos`,
`benchmarks/sr_photos.py`): what each stage is given and scored against, and the reports."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from cascade.cli import main
from cascade.config import parse_config
from cascade.registry import get_stage
from superres.metrics import bicubic_upsample, psnr

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("skimage")

TWO = ("astronaut.png", "camera.png")


def _stage(name, **overrides):
    cls = get_stage(name)
    small = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1], residual=True, prediction="x0",
                 steps=2)
    return cls(parse_config(cls.Config, {**small, **overrides}))


def test_pairs_are_whole_scenes_for_sr256_and_native_windows_for_sr1024():
    from cascade.data.folder import square_resize
    from cascade.data.reader import image_to_tensor
    from superres.photos import PHOTOS, load_photos, photo_pairs

    photos = load_photos(TWO)
    assert set(photos) == set(TWO) and all(p.mode == "RGB" for p in photos.values())  # camera.png is grey
    low, high, names = photo_pairs("sr256", photos)
    assert names == list(TWO) and low.shape == (2, 3, 64, 64) and high.shape == (2, 3, 256, 256)
    assert torch.equal(high[0], image_to_tensor(square_resize(photos["astronaut.png"], 256)))
    low, high, _ = photo_pairs("sr1024", photos)
    assert low.shape == (2, 3, 64, 64) and high.shape == (2, 3, 256, 256)
    # the high-res window is the photo's own pixels: it occurs in the 512x512 original at a stride-64 position
    full = image_to_tensor(photos["astronaut.png"])
    hits = [(y, x) for y in range(0, 257, 64) for x in range(0, 257, 64)
            if torch.equal(full[:, y:y + 256, x:x + 256], high[0])]
    assert len(hits) == 1
    assert len(PHOTOS) == 14 and len(load_photos()) == 14


def test_a_fresh_residual_stage_scores_exactly_bicubic_and_a_changed_one_does_not():
    """A fresh residual x0 model outputs bicubic (its last layer starts at zero): the two scores agree to the
    last digit. After its output layer is perturbed, they differ."""
    from superres.photos import evaluate_photos, load_photos, photo_pairs

    photos = load_photos(TWO)
    for name in ("sr256", "sr1024"):
        stage = _stage(name)
        pairs = low, high, _ = photo_pairs(name, photos)
        scores, out = evaluate_photos(stage, pairs=pairs)
        assert scores["photos"] == 2 and out.shape == (2, 3, 256, 256)
        assert scores["psnr_photos"] == pytest.approx(scores["psnr_photos_bicubic"], abs=1e-4)
        assert scores["psnr_photos_bicubic"] == pytest.approx(psnr(bicubic_upsample(low, 256), high).mean().item())
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(0.05)
    assert evaluate_photos(stage, pairs=pairs)[0]["psnr_photos"] != pytest.approx(scores["psnr_photos_bicubic"])


def test_eval_photos_flag_adds_the_photo_scores(bundle, tmp_path, monkeypatch):
    import superres.photos
    from cascade.data.shapes import samples

    monkeypatch.setattr(superres.photos, "PHOTOS", TWO)  # two of the 14, for time
    from cascade.data.shards import ShardWriter

    data = tmp_path / "data"
    items = list(samples(4, (64, 256), seed=0))
    for split in ("train", "val"):
        with ShardWriter(data / split, max_count=8) as writer:
            for s in items:
                writer.write(s.key, {"64.png": s.images[64], "256.png": s.images[256], "txt": s.txt,
                                     "json": s.json})
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(bundle), "--data", str(data), "--out", str(out), "--stages", "sr256",
                 "--photos"]) == 0
    report = json.loads((out / "eval.json").read_text())["sr256"]
    assert {"psnr_photos", "ssim_photos", "psnr_photos_bicubic", "ssim_photos_bicubic"} <= set(report)
    assert report["photos"] == 2 and 10 < report["psnr_photos_bicubic"] < 40


def test_eval_photos_without_scikit_image_is_one_line(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    assert main(["eval", "--model", str(bundle), "--data", str(tmp_path), "--out", str(tmp_path / "e"),
                 "--photos"]) == 2
    err = capsys.readouterr().err
    assert "pip install scikit-image" in err and "Traceback" not in err


def test_the_benchmark_puts_models_side_by_side_with_a_figure(bundle, tmp_path, capsys, monkeypatch):
    import superres.photos
    from benchmarks.sr_photos import main as bench

    monkeypatch.setattr(superres.photos, "PHOTOS", ("astronaut.png", "coffee.png", "motorcycle_left.png"))
    figure = tmp_path / "photos.png"
    assert bench(["--model", f"a={bundle}", "--model", f"b={bundle}", "--stages", "sr256",
                  "--figure", str(figure)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = line["stages"]["sr256"]
    assert set(row) == {"bicubic", "a", "b"} and row["a"]["psnr"] == row["b"]["psnr"]  # same bundle, same seed
    width, height = Image.open(figure).size
    assert width >= 4 * 256 and height >= 3 * 256  # bicubic, a, b, real; three photos
    assert bench(["--model", str(bundle), "--stages", "sr512"]) == 2

"""The clip stage: recall and the ridge baseline on hand-checked cases, a contrastive loss that falls,
evaluation that reports both, configs that validate, and export -> load giving identical embeddings."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cascade.bundle import save_stage
from cascade.clip_stage import ClipStage, ClipStageConfig, retrieval
from cascade.config import parse_config, read_yaml
from cascade.encoders import load_encoder
from cascade.errors import ConfigError
from cascade.registry import get_stage
from cascade.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_batch():
    """12 pairs "a <colour> <shape>" with their 64x64 drawings, in [-1, 1]."""
    keys, texts, images = [], [], []
    for colour, rgb in COLORS.items():
        for shape in SHAPES:
            im = Image.new("RGB", (64, 64), "white")
            draw = ImageDraw.Draw(im)
            {"circle": draw.ellipse, "square": draw.rectangle}.get(shape, lambda box, fill: draw.polygon(
                [(32, 8), (56, 54), (8, 54)], fill=fill))([12, 12, 52, 52], fill=rgb)
            keys.append(f"{colour}-{shape}")
            texts.append(f"a {colour} {shape}")
            images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return {"key": keys, "txt": texts, "image_64": torch.stack(images)}


def test_recall_matches_a_hand_computed_case():
    queries = torch.eye(3)
    # key 0 is its query's best match; key 1 is second for query 1 (key 0 scores higher); key 2 third
    keys = torch.tensor([[1.0, 0.9, 0.5], [0.0, 0.5, 0.6], [0.0, 0.0, 0.1]])
    r = retrieval.recall_at_k(queries, keys, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(1.0)}


def test_retrieval_metrics_of_identical_embeddings_are_perfect():
    z = torch.randn(20, 8)
    assert set(retrieval.retrieval_metrics(z, z * 3).values()) == {1.0}


def test_ridge_recovers_a_linear_map_and_retrieves_through_it():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 6, generator=g)
    x_train, x_val = torch.randn(200, 16, generator=g), torch.randn(50, 16, generator=g)
    mean, std, w = retrieval.fit_ridge(x_train, x_train @ a + 2.0, lam=1e-8)
    torch.testing.assert_close(retrieval.predict_ridge((mean, std, w), x_val), (x_val @ a + 2.0).double(),
                               rtol=1e-5, atol=1e-5)  # exact up to the float32 inputs
    noisy = x_val @ a + 0.05 * torch.randn(50, 6, generator=g)
    metrics = retrieval.ridge_baseline(x_train, x_train @ a, x_val, noisy)
    assert metrics["ridge_i2t_r1"] > 0.9 and metrics["ridge_t2i_r10"] == 1.0
    unrelated = retrieval.ridge_baseline(x_train, torch.randn(200, 6, generator=g), x_val, noisy)
    assert unrelated["ridge_i2t_r1"] < 0.3


def test_stage_is_registered_with_its_contract():
    cls = get_stage("clip")
    assert cls is ClipStage and cls.needs_embeddings is False and cls.samples_images is False
    assert cls.image_sizes == (64,)


@pytest.fixture(scope="module")
def trained():
    """The LiT towers locked, heads trained 30 steps on the 12 shape pairs."""
    torch.manual_seed(0)
    stage = ClipStage(ClipStageConfig(embed_dim=64, image_size=64, max_text_len=8, ridge_train_samples=8,
                                      ridge_baseline=False))
    batch = shape_batch()
    before = stage.evaluate([batch], torch.Generator())
    stage.train()
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = stage.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return stage, batch, losses, before


def test_contrastive_loss_falls_over_30_steps(trained):
    _, batch, losses, _ = trained
    assert losses[0] == pytest.approx(np.log(len(batch["txt"])), abs=0.5)  # chance level at the start
    assert np.mean(losses[-5:]) < 0.25 * losses[0]


def test_cached_locked_trunk_features_give_the_same_loss(trained):
    stage, batch, _, _ = trained
    stage.train()
    assert stage._trunk_cache is not None and set(stage._trunk_cache) == set(batch["key"])
    cached = stage.loss(batch)
    cache, stage._trunk_cache = stage._trunk_cache, None
    try:
        fresh = stage.loss(batch)
    finally:
        stage._trunk_cache = cache
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)


def test_evaluate_reports_recall_beside_the_ridge_baseline(trained):
    stage, batch, _, before = trained
    stage.config.ridge_baseline = True
    try:
        metrics = stage.evaluate([batch], torch.Generator(), train_batches=[batch])
    finally:
        stage.config.ridge_baseline = False
    assert metrics["val_pairs"] == 12
    assert metrics["i2t_r1"] > before["i2t_r1"] and metrics["i2t_r1"] >= 0.9
    assert metrics["ridge_train_pairs"] == 8  # capped by ridge_train_samples
    for name in ("i2t", "t2i"):
        assert 0.0 <= metrics[f"ridge_{name}_r1"] <= metrics[f"ridge_{name}_r10"] <= 1.0


def test_export_then_load_gives_identical_embeddings(trained, tmp_path):
    stage, batch, _, _ = trained
    stage.eval()
    folder = save_stage(stage, tmp_path / "bundle" / "clip")
    loaded = load_encoder(folder)
    torch.testing.assert_close(loaded.encode_image(batch["image_64"]), stage.encode_image(batch["image_64"]),
                               rtol=0, atol=0)
    for ours, theirs in zip(loaded.encode_text(batch["txt"]), stage.encode_text(batch["txt"])):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/clip.yaml")), ids=lambda p: p.parent.name)
def test_shipped_configs_validate(path):
    data = read_yaml(path)
    assert set(data) == {"stage", "model", "train"} and data["stage"] == "clip"
    parse_config(ClipStageConfig, data["model"], str(path))
    parse_config(TrainConfig, data["train"], str(path))


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'embed_dims'"):
        parse_config(ClipStageConfig, {"embed_dims": 3}, "clip.yaml")


def test_dalle2_config_builds_vit_h_on_the_meta_device():
    data = read_yaml(ROOT / "configs/dalle2/clip.yaml")
    with torch.device("meta"):
        stage = ClipStage(parse_config(ClipStageConfig, data["model"]))
    params = sum(p.numel() for p in stage.parameters())
    assert 0.9e9 < params < 1.1e9  # ViT-H/16 (632M) + a 24-layer 1024-wide text transformer (354M)
    assert (stage.embed_dim, stage.token_dim) == (1024, 1024)
    assert next(stage.parameters()).device.type == "meta"


def test_the_clip_stage_trains_with_bf16_towers_from_fp32_images():
    """DeepSpeed's bf16 casts the towers' weights while the images stay fp32: the towers read them in
    their own dtype, and the loss matches fp32's."""
    from bundle_helpers import seeded_stage

    full = seeded_stage("clip", embed_dim=32, head="linear", image_size=64, max_text_len=16)
    half = seeded_stage("clip", embed_dim=32, head="linear", image_size=64, max_text_len=16).to(torch.bfloat16)
    batch = {"image_64": torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "txt": ["a red circle", "a blue square", "a green star", "a big yellow heart"], "key": list("abcd")}
    loss = half.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(full.loss(batch).item(), rel=0.05)

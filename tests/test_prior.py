"""The diffusion prior: network contracts, sampling (guidance, draw-two), metrics, configs, sizes."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cascade.config import load_config, parse_config, read_yaml
from cascade.errors import ConfigError, UserError
from cascade.registry import get_stage
from prior import PriorConfig, PriorStage
from prior.metrics import embedding_scores, nearest_caption_images, retrieval_ranks
from prior.synthetic import batches, make_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = dict(embed_dim=16, token_dim=8, max_text_len=6, width=32, depth=2, heads=2, timesteps=100,
             steps=8, guidance=1.0)


def small_stage(**overrides) -> PriorStage:
    torch.manual_seed(0)
    stage = PriorStage(PriorConfig(**{**SMALL, **overrides}))
    # A freshly initialised network is almost constant in its inputs; spread the null values and the
    # query so conditioning visibly matters in these contract tests.
    with torch.no_grad():
        for p in stage.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return stage.eval()


def conditioning(b: int, cfg: PriorConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, cfg.max_text_len, dtype=torch.bool)
    mask[:, cfg.max_text_len // 2:] = torch.rand(b, cfg.max_text_len - cfg.max_text_len // 2, generator=g) > 0.5
    return {"clip_text": F.normalize(torch.randn(b, cfg.embed_dim, generator=g), dim=-1),
            "clip_tokens": torch.randn(b, cfg.max_text_len, cfg.token_dim, generator=g),
            "clip_mask": mask}


def test_registered_with_the_stage_contract():
    cls = get_stage("prior")
    assert cls is PriorStage
    assert cls.needs_embeddings and cls.image_sizes == () and not cls.samples_images


def test_loss_is_a_finite_scalar_with_gradients_everywhere():
    stage = small_stage().train()
    cfg = stage.config
    batch = {**conditioning(4, cfg), "clip_image": F.normalize(torch.randn(4, cfg.embed_dim), dim=-1)}
    loss = stage.loss(batch)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    unused = [n for n, p in stage.named_parameters() if p.grad is None and not n.startswith("net.null")]
    assert unused == []


def test_sample_shapes_dtype_and_unit_norm():
    stage = small_stage()
    cfg = stage.config
    for sampler in ("ddim", "dpmpp"):
        z = stage.sample(conditioning(3, cfg), sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert z.shape == (3, cfg.embed_dim) and z.dtype == torch.float32
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


def test_same_generator_seed_same_embeddings():
    stage = small_stage()
    cond = conditioning(3, stage.config)
    a = stage.sample(cond, generator=torch.Generator().manual_seed(5))
    b = stage.sample(cond, generator=torch.Generator().manual_seed(5))
    c = stage.sample(cond, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_dropped_rows_ignore_the_caption_and_kept_rows_use_it():
    stage = small_stage()
    cfg = stage.config
    a, b = conditioning(4, cfg, seed=1), conditioning(4, cfg, seed=2)
    x, t = torch.randn(4, cfg.embed_dim), torch.tensor([0, 10, 50, 99])
    keep = torch.tensor([True, False, True, False])
    out_a = stage.net(x, t, a["clip_text"], a["clip_tokens"], a["clip_mask"], keep)
    out_b = stage.net(x, t, b["clip_text"], b["clip_tokens"], b["clip_mask"], keep)
    torch.testing.assert_close(out_a[~keep], out_b[~keep])
    assert (out_a[keep] - out_b[keep]).abs().amax() > 1e-3


def test_masked_token_states_do_not_matter():
    stage = small_stage()
    cfg = stage.config
    c = conditioning(2, cfg)
    c["clip_mask"][:, -2:] = False
    changed = c["clip_tokens"].clone()
    changed[:, -2:] += 10.0
    x, t = torch.randn(2, cfg.embed_dim), torch.tensor([3, 70])
    out = stage.net(x, t, c["clip_text"], c["clip_tokens"], c["clip_mask"])
    torch.testing.assert_close(out, stage.net(x, t, c["clip_text"], changed, c["clip_mask"]))
    changed[:, 0] += 10.0  # a visible token does
    assert (out - stage.net(x, t, c["clip_text"], changed, c["clip_mask"])).abs().amax() > 1e-3


def test_guidance_one_equals_no_guidance_and_ignores_the_null_values():
    stage = small_stage()
    cond = conditioning(3, stage.config)
    x_T = torch.randn(6, stage.config.embed_dim, generator=torch.Generator().manual_seed(3))
    plain = stage.sample(cond, guidance=1.0, x_T=x_T)
    guided = stage.sample(cond, guidance=3.0, x_T=x_T)
    with torch.no_grad():  # random, not constant: the blocks' LayerNorms would remove a constant shift
        stage.net.null_text.add_(torch.randn_like(stage.net.null_text))
        stage.net.null_tokens.add_(torch.randn_like(stage.net.null_tokens))
    # w = 1 is the conditional model alone: the unconditional branch (null values) cannot matter.
    assert torch.equal(stage.sample(cond, guidance=1.0, x_T=x_T), plain)
    assert (stage.sample(cond, guidance=3.0, x_T=x_T) - guided).abs().amax() > 1e-4
    assert (guided - plain).abs().amax() > 1e-4


def test_guidance_zero_is_the_unconditional_model():
    stage = small_stage()
    cfg = stage.config
    x_T = torch.randn(3, cfg.embed_dim, generator=torch.Generator().manual_seed(4))
    a = stage.sample(conditioning(3, cfg, seed=1), guidance=0.0, candidates=1, x_T=x_T)
    b = stage.sample(conditioning(3, cfg, seed=2), guidance=0.0, candidates=1, x_T=x_T)
    torch.testing.assert_close(a, b)


def test_draw_two_keeps_the_candidate_closer_to_the_text():
    stage = small_stage()
    cfg = stage.config
    cond = conditioning(4, cfg)
    x_T = torch.randn(8, cfg.embed_dim, generator=torch.Generator().manual_seed(7))
    # Candidate j of caption i starts from row 2 i + j; draw each on its own.
    singles = [stage.sample(cond, candidates=1, x_T=x_T[j::2]) for j in (0, 1)]
    both = torch.stack(singles, dim=1)  # (B, 2, D)
    closer = (both * cond["clip_text"][:, None]).sum(-1).argmax(dim=1)
    assert closer.unique().numel() == 2, "the fixture should exercise both choices"
    picked = stage.sample(cond, candidates=2, x_T=x_T)
    torch.testing.assert_close(picked, both[torch.arange(4), closer])


def test_mismatched_embedding_width_is_a_user_error():
    stage = small_stage()
    cond = conditioning(2, stage.config)
    cond["clip_text"] = torch.randn(2, stage.config.embed_dim + 1)
    with pytest.raises(UserError, match="clip_text"):
        stage.sample(cond)


def test_retrieval_ranks_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = torch.tensor([[1.0, 0.1], [1.0, 0.2], [0.0, -1.0]])
    # q0 is nearest g0 (rank 1); q1 is nearer g0 than g1 (rank 2); q2 is equidistant from g0 and g2
    # and opposite g1: g2 ties with g0, so rank 1.
    assert retrieval_ranks(query, gallery).tolist() == [1, 2, 1]
    scores = embedding_scores("x", query, gallery)
    assert scores["x_mean_rank"] == pytest.approx(4 / 3) and scores["x_r1"] == pytest.approx(2 / 3)
    assert scores["x_cos"] == pytest.approx(((1 / 1.01 ** 0.5) + 0.2 / 1.04 ** 0.5 + 0.0) / 3)


def test_nearest_caption_baseline_by_hand():
    train_text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    train_image = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    val_text = torch.tensor([[0.0, 2.0], [0.9, 0.1], [0.5, 0.9]])
    assert nearest_caption_images(val_text, train_text, train_image)[:, 0].tolist() == [2.0, 1.0, 3.0]


def test_evaluate_reports_both_baselines():
    stage = small_stage(eval_max_samples=20, train_pool_size=30)
    cfg = stage.config
    dims = dict(embed_dim=cfg.embed_dim, token_dim=cfg.token_dim, max_text_len=cfg.max_text_len)
    train, val = make_pairs(40, **dims, seed=0), make_pairs(25, **dims, seed=1)
    out = stage.evaluate(batches(val, 8), torch.Generator().manual_seed(0), train_pairs=train)
    assert out["val_count"] == 20 and out["nn_pool"] == 30
    for prefix in ("prior", "text", "nn"):
        assert -1 <= out[f"{prefix}_cos"] <= 1 and 1 <= out[f"{prefix}_mean_rank"] <= 20
        assert 0 <= out[f"{prefix}_r1"] <= 1
    text_only = stage.evaluate(batches(val, 8), torch.Generator().manual_seed(0))
    assert "nn_cos" not in text_only
    assert text_only["prior_cos"] == out["prior_cos"]  # same generator, same samples


class _Counted:
    """An iterable of batches that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_evaluate_reads_the_train_batches_it_is_given_once(tmp_path):
    from cascade.data.reader import make_val_batches
    from prior.synthetic import write_shards

    stage = small_stage(eval_max_samples=20)
    cfg = stage.config
    write_shards(tmp_path, 30, 12, shard_size=16, embed_dim=cfg.embed_dim, token_dim=cfg.token_dim,
                 max_text_len=cfg.max_text_len)
    val = make_val_batches(tmp_path, image_sizes=(), with_embeddings=True, batch_size=5)
    train = _Counted(make_val_batches(tmp_path, image_sizes=(), with_embeddings=True, batch_size=7,
                                      split="train"))
    # The stage reads no files of its own: without train batches there is no nearest-caption baseline.
    assert "nn_pool" not in stage.evaluate(val, torch.Generator().manual_seed(0))
    out = stage.evaluate(val, torch.Generator().manual_seed(0), train)
    assert out["val_count"] == 12 and out["nn_pool"] == 30
    assert stage.evaluate(val, torch.Generator().manual_seed(0), train)["nn_cos"] == out["nn_cos"]
    assert train.reads == 1  # the same object again: cached
    # The nearest train caption of the val split written from the same pairs, by hand.
    dims = dict(embed_dim=cfg.embed_dim, token_dim=cfg.token_dim, max_text_len=cfg.max_text_len)
    train_pairs, val_pairs = make_pairs(30, **dims, seed=0), make_pairs(12, **dims, seed=1)
    picked = nearest_caption_images(val_pairs["clip_text"], train_pairs["clip_text"], train_pairs["clip_image"])
    expected = F.cosine_similarity(picked, val_pairs["clip_image"], dim=-1).mean().item()
    assert out["nn_cos"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("size", ["tiny", "dalle2"])
def test_configs_validate(size):
    data = read_yaml(CONFIGS / size / "prior.yaml")
    assert set(data) == {"stage", "model", "train"} and data["stage"] == "prior"
    parse_config(PriorConfig, data["model"], f"{size}/prior.yaml")
    from cascade.training.config import load_run_config

    run = load_run_config(CONFIGS / size / "prior.yaml", "prior")  # the engine's own check, train: included
    assert run.stage == "prior"


def test_unknown_model_key_names_the_key(tmp_path):
    path = tmp_path / "prior.yaml"
    path.write_text("width: 8\nwidht: 9\n")
    with pytest.raises(ConfigError, match="unknown key 'widht'.*prior.yaml|prior.yaml.*unknown key 'widht'"):
        load_config(PriorConfig, path)


def test_dalle2_prior_has_the_published_size_on_the_meta_device():
    cfg = parse_config(PriorConfig, read_yaml(CONFIGS / "dalle2" / "prior.yaml")["model"])
    with torch.device("meta"):
        stage = PriorStage(cfg)
    count = sum(p.numel() for p in stage.parameters())
    # Ramesh et al. 2022, table 3: width 2048, 24 layers, 32 heads, labelled "1B". A transformer block
    # of width W with a 4W MLP holds 12 W^2 weights, so that shape is 12 * 2048^2 * 24 = 1.21B.
    assert (cfg.width, cfg.depth, cfg.heads) == (2048, 24, 32)
    published = 12 * 2048 ** 2 * 24
    assert abs(count - published) / published < 0.10
    assert 1.0e9 <= count <= 1.3e9

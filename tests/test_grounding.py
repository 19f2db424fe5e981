"""Token grounding (`grounding_loss`, decoder/grounding.py): each shapes object's colour and shape tokens found
in its caption, its coverage at each attention resolution, the loss against its closed form, the recorded
attention against SDPA's, and the decoder's loss with it: the diffusion loss plus the weight times the term,
which training lowers; the diagnostic that reads the same shares (`benchmarks/grounding_share.py`); and the
colour dropout (`p_drop_colour`) that cuts colour words from training captions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bundle_helpers import DECODER, seeded_stage
from cascade.data.shapes import scene_for
from decoder.grounding import (cell_word_targets, drop_colours, grounding_loss, grounding_targets, inside_share,
                               object_masks, object_token_spans)

ROOT = Path(__file__).resolve().parents[1]
IMAGEN = {**DECODER, "conditioning": "imagen", "text_len": 48}


@pytest.fixture(scope="module")
def tokenizer():
    from cascade.encoders.frozen_text import frozen_text_encoder

    return frozen_text_encoder("minilm_l6", 48, "cpu").tokenizer


def test_each_objects_colour_and_shape_tokens_are_found_in_scene_order(tokenizer):
    captions, scenes = zip(*[scene_for(0, i) for i in range(300)])
    targets = grounding_targets(list(captions), list(scenes), tokenizer, 48)
    ids = tokenizer(list(captions), truncation=True, max_length=48)["input_ids"]
    for caption, scene, sample, row in zip(captions, scenes, targets, ids):
        assert [k for _, k in sample] == list(range(len(scene["objects"]))), caption  # every phrasing
        for tokens, k in sample:
            words = tokenizer.convert_ids_to_tokens([row[j - 1] for j in tokens])  # context j = token j - 1
            assert words == [scene["objects"][k]["color"], scene["objects"][k]["shape"]], caption
    star = {"objects": [{"color": "red", "shape": "star"}, {"color": "blue", "shape": "circle"}]}
    assert object_token_spans("a red star above a blue circle", star) == [[(2, 5), (6, 10)], [(19, 23), (24, 30)]]
    assert object_token_spans("a blue circle below a red star", star) is None  # not in the json's order
    assert object_token_spans("a red circle", {"source": "emoji"}) is None  # not a shapes scene
    assert grounding_targets(["a grinning face"], [{}], tokenizer, 48) == [[]]


def test_grounding_places_adds_the_words_naming_each_objects_cell(tokenizer):
    """`grounding_places`: an object's cell name ("top left", "center") joins its colour and shape tokens where the
    caption names its cell; the pair a relation places gets none, and "at the top" is not read inside "at the top
    left"."""
    scene = {"objects": [{"color": "red", "shape": "star", "cell": [0, 0]},
                         {"color": "blue", "shape": "circle", "cell": [0, 1]},
                         {"color": "green", "shape": "heart", "cell": [1, 1]}]}
    caption = "a big red star at the top left, a small blue circle at the top and a green heart in the center"
    spans = object_token_spans(caption, scene, places=True)
    assert [[caption[a:b] for a, b in obj] for obj in spans] == [
        ["red", "star", "top left"], ["blue", "circle", "top"], ["green", "heart", "center"]]
    assert object_token_spans(caption, scene) == [obj[:2] for obj in spans]  # off: colour and shape only
    relation = "a big red star to the left of a small blue circle, and a green heart in the center"
    spans = object_token_spans(relation, scene, places=True)
    assert [[relation[a:b] for a, b in obj] for obj in spans] == [
        ["red", "star"], ["blue", "circle"], ["green", "heart", "center"]]
    # every phrasing of real scenes ("at the bottom, a large pink heart" too): each object's tokens are its colour
    # and shape words, and its cell's words where the caption names its cell
    captions, scenes = zip(*[scene_for(0, i) for i in range(300)])
    targets = grounding_targets(list(captions), list(scenes), tokenizer, 48, places=True)
    ids = tokenizer(list(captions), truncation=True, max_length=48)["input_ids"]
    named = 0
    for caption, scene, sample, row in zip(captions, scenes, targets, ids):
        assert [k for _, k in sample] == list(range(len(scene["objects"]))), caption
        for tokens, k in sample:
            obj = scene["objects"][k]
            words = tokenizer.convert_ids_to_tokens([row[j - 1] for j in tokens])
            noun = [obj["color"], obj["shape"]]
            assert sorted(words) in (sorted(noun), sorted(noun + obj["position"].split())), caption
            named += len(words) > 2
    assert named > 300  # most objects' captions name their cell


def test_object_masks_are_the_renderers_coverage_scaled_to_one():
    _, scene = next(scene_for(0, i) for i in range(50) if len(scene_for(0, i)[1]["objects"]) == 3)
    for size in (8, 16):
        masks = object_masks(scene, size)
        assert masks.shape == (3, size * size) and torch.allclose(masks.amax(1), torch.ones(3))
        for mask, obj in zip(masks, scene["objects"]):
            rows, cols = divmod(int(mask.argmax()), size)
            cx, cy = obj["center"]
            assert abs((cols + 0.5) / size - cx) <= 1 / size and abs((rows + 0.5) / size - cy) <= 1 / size
            ys, xs = ((torch.arange(size) + 0.5) / size).reshape(-1, 1), ((torch.arange(size) + 0.5) / size)
            far = (xs - cx).abs().maximum((ys - cy).abs()) > obj["radius"] + 1 / size
            assert (mask.reshape(size, size)[far] == 0).all()  # nothing beyond the object's own square


def test_the_loss_is_the_share_of_each_tokens_attention_outside_its_object():
    _, scene = next(scene_for(0, i) for i in range(50) if len(scene_for(0, i)[1]["objects"]) == 2)
    mask = object_masks(scene, 8)
    length = 6
    targets = [[([2, 3], 0), ([4, 5], 1)]]
    inside = torch.zeros(1, 64, length)
    inside[0, mask[0].argmax(), 2:4] = 0.5
    inside[0, mask[1].argmax(), 4:6] = 0.5
    keep = torch.ones(1, dtype=torch.bool)
    assert grounding_loss([inside], targets, [scene], keep).item() == pytest.approx(0.0, abs=1e-6)
    swapped = inside.clone()
    swapped[..., 2:4], swapped[..., 4:6] = inside[..., 4:6], inside[..., 2:4]
    assert grounding_loss([swapped], targets, [scene], keep).item() == pytest.approx(1.0, abs=1e-6)
    uniform = torch.full((1, 64, length), 0.01)
    want = 1 - (mask[0].mean() + mask[1].mean()) / 2
    assert grounding_loss([uniform], targets, [scene], keep).item() == pytest.approx(want.item(), rel=1e-5)
    # two maps (two blocks) average; a row whose text was dropped adds nothing
    assert grounding_loss([inside, swapped], targets, [scene], keep).item() == pytest.approx(0.5, abs=1e-6)
    assert grounding_loss([swapped], targets, [scene], ~keep).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_batched_loss_is_the_per_object_sum_with_its_gradient(dtype):
    """The loss as one batched product per map equals L(j) written out object by object, token by token
    (value and gradient), over a batch mixing 1-3 object scenes, a dropped text, a non-shapes sample and
    two map sizes; it is computed in the maps' dtype."""
    scenes = [scene_for(3, i)[1] for i in range(40)]
    batch = [next(s for s in scenes if len(s["objects"]) == n) for n in (3, 1, 2, 2)] + [{}]
    targets = [[([1, 2], 0), ([4], 1), ([6, 7, 8], 2)], [([3, 5], 0)], [([1], 0), ([2, 3], 1)],
               [([2], 1)], []]
    keep = torch.tensor([True, True, True, False, True])
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(5, size * size, 10, generator=gen).to(dtype).requires_grad_() for size in (16, 8)]

    def written_out(maps):
        terms = []
        for attention in maps:
            size = int(attention.shape[1] ** 0.5)
            for b, sample in enumerate(targets):
                if not sample or not keep[b]:
                    continue
                masks = object_masks(batch[b], size).to(attention.dtype)
                for tokens, k in sample:
                    for j in tokens:
                        a = attention[b, :, j]
                        terms.append(1 - (masks[k] * a).sum() / a.sum())
        return torch.stack(terms).mean()

    got, want = grounding_loss(maps, targets, batch, keep), written_out(maps)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.item() == pytest.approx(want.item(), abs=tol)
    g_got = torch.autograd.grad(got, maps)
    g_want = torch.autograd.grad(want, maps)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a.float(), b.float(), atol=tol * 1e-2 if dtype == torch.float32 else 1e-3)
        assert b.float().abs().sum() > 0
    # the dropped row and the non-shapes sample get no gradient
    assert g_got[0][3:].abs().sum() == 0


def test_recorded_attention_is_what_sdpa_computes():
    from cascade.nn.attention import SelfAttention2d

    torch.manual_seed(0)
    block = SelfAttention2d(16, head_dim=8, context_dim=12, size=4)
    torch.nn.init.normal_(block.proj.weight, std=0.1)
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    plain = block(x, context, mask)
    block.record = maps = []
    recorded = block(x, context, mask)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-6)
    (shares,) = maps
    assert shares.shape == (2, 16, 5) and (shares[1, :, 3:] == 0).all()  # masked tokens get nothing
    assert ((shares.sum(-1) > 0) & (shares.sum(-1) < 1)).all()  # the rest went to the image's own positions
    with torch.no_grad():
        block(x, context, mask)
    assert len(maps) == 1  # no recording without gradients (a self-conditioning estimate, sampling)


@pytest.mark.parametrize("masked", [False, True])
def test_the_fused_shares_and_their_gradients_equal_the_explicit_probabilities(monkeypatch, masked):
    """From 256 queries on the CPU the shares come from the fused kernel's log-sum-exp; the attention's
    output, the shares and every input's gradient must be the explicit softmax's."""
    import cascade.nn.attention as attention

    if attention._FLASH_CPU_BACKWARD is None:
        pytest.skip("this torch build has no fused CPU attention backward")
    torch.manual_seed(0)
    n_self, n_ctx = 256, 7
    q = torch.randn(2, 2, n_self, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, n_self + n_ctx, 16, requires_grad=True) for _ in range(2))
    mask = None
    if masked:  # the second row's last three context tokens are padding
        mask = torch.ones(2, 1, 1, n_self + n_ctx, dtype=torch.bool)
        mask[1, ..., -3:] = False
    weights = torch.rand(2, 2, n_self, 16), torch.rand(2, n_self, n_ctx)
    results, apply = [], attention._AttentionLSE.apply
    for fused_from in (256, 10**9):  # the fused path, then the explicit one
        monkeypatch.setattr(attention, "_FUSED_SHARES_FROM", fused_from)
        calls = []
        monkeypatch.setattr(attention._AttentionLSE, "apply", lambda *a, calls=calls: (calls.append(1), apply(*a))[1])
        out, shares = attention.attention_with_shares(q, k, v, mask, n_self)
        ((out * weights[0]).sum() + (shares * weights[1]).sum()).backward()
        results.append((calls, out.detach(), shares.detach(), *(t.grad.clone() for t in (q, k, v))))
        for t in (q, k, v):
            t.grad = None
    (fused_calls, *fused), (explicit_calls, *explicit) = results
    assert fused_calls == [1] and explicit_calls == []
    if masked:
        assert (fused[1][1, :, -3:] == 0).all() and fused[4][1, :, -3:].abs().sum() == 0  # no share, no value grad
    for got, want in zip(fused, explicit):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert explicit[3][..., n_self:, :].abs().sum() > 0  # the shares' gradient reaches the context keys


@pytest.mark.parametrize("places", [False, True])
def test_the_decoders_loss_adds_the_weighted_term_and_training_lowers_it(places):
    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render

    captions, scenes = zip(*[scene_for(0, i) for i in range(40) if len(scene_for(0, i)[1]["objects"]) >= 2][:4])
    batch = {"image_64": torch.stack([image_to_tensor(render(s, 64)) for s in scenes]), "txt": list(captions),
             "json": list(scenes)}
    plain = seeded_stage("decoder", **IMAGEN)
    grounded = seeded_stage("decoder", **IMAGEN, grounding_loss=1.0, grounding_places=places)
    grounded.load_state_dict(plain.state_dict())
    if places:  # the term reads the cell words as well: not the colour-and-shape term of the same weights
        words = seeded_stage("decoder", **IMAGEN, grounding_loss=1.0)
        words.load_state_dict(plain.state_dict())
        torch.manual_seed(0)
        with_places = grounded.loss(batch).item()
        torch.manual_seed(0)
        assert with_places != pytest.approx(words.loss(batch).item(), abs=1e-4)

    def term(seed: int) -> float:
        """The grounded loss minus the plain one, the same weights and draws: the weight (1) times the term."""
        plain.load_state_dict(grounded.state_dict())
        torch.manual_seed(seed)
        total = grounded.loss(batch)  # with gradients: the attention is recorded only then
        torch.manual_seed(seed)
        return (total - plain.loss(batch)).item()

    first = term(0) + term(1)
    assert 0.1 < first < 2.0  # two shares in (0, 1]
    opt = torch.optim.Adam(grounded.parameters(), lr=3e-3)
    for step in range(15):
        torch.manual_seed(step % 2)
        loss = grounded.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert term(0) + term(1) < 0.8 * first


def test_grounding_needs_the_imagen_decoder_and_no_checkpointing():
    from cascade.config import ConfigError
    from decoder.config import DecoderConfig

    with pytest.raises((ValueError, ConfigError), match="conditioning: imagen"):
        DecoderConfig(grounding_loss=0.1)
    with pytest.raises((ValueError, ConfigError), match="gradient_checkpointing"):
        DecoderConfig(conditioning="imagen", grounding_loss=0.1, gradient_checkpointing=True)
    with pytest.raises((ValueError, ConfigError), match="set grounding_loss too"):
        DecoderConfig(conditioning="imagen", grounding_places=True)


def test_cell_word_targets_are_the_place_tokens_without_colour_and_shape(tokenizer):
    captions, scenes = zip(*[scene_for(0, i) for i in range(120)])
    cells = cell_word_targets(list(captions), list(scenes), tokenizer, 48)
    ids = tokenizer(list(captions), truncation=True, max_length=48)["input_ids"]
    named = 0
    for caption, scene, sample, row in zip(captions, scenes, cells, ids):
        for tokens, k in sample:
            words = tokenizer.convert_ids_to_tokens([row[j - 1] for j in tokens])
            assert words == scene["objects"][k]["position"].split(), caption  # "top left", never "red star"
            named += 1
    assert named > 100


def test_inside_share_is_one_minus_the_loss_and_the_coverage_for_even_attention():
    _, scene = next(scene_for(0, i) for i in range(50) if len(scene_for(0, i)[1]["objects"]) == 2)
    mask = object_masks(scene, 8)
    targets = [[([2], 0), ([3], 1)]]
    inside = torch.zeros(1, 64, 4)
    inside[0, mask[0].argmax(), 2] = inside[0, mask[1].argmax(), 3] = 0.5
    assert inside_share([inside], targets, [scene]) == pytest.approx(1.0, abs=1e-6)
    swapped = inside[..., [0, 1, 3, 2]]
    assert inside_share([swapped], targets, [scene]) == pytest.approx(0.0, abs=1e-6)
    even = inside_share([torch.ones(1, 64, 4)], targets, [scene])
    assert even == pytest.approx(((mask[0].mean() + mask[1].mean()) / 2).item(), rel=1e-5)
    assert inside_share([inside], [[]], [scene]) is None


def test_text_attention_is_one_recorded_map_per_text_block_without_gradients():
    stage = seeded_stage("decoder", **IMAGEN).eval()
    captions, scenes = zip(*[scene_for(0, i) for i in range(2)])
    x_t, t = torch.randn(2, 3, 64, 64), torch.tensor([10, 900])
    maps = stage.text_attention(x_t, t, list(captions))
    blocks = [m for m in stage.unet.modules() if getattr(m, "context_kv", None) is not None]
    assert len(maps) == len(blocks) >= 1
    for m in maps:
        assert m.shape[0] == 2 and m.shape[2] == 1 + 48 and not m.requires_grad  # null token + text_len
        assert (m >= 0).all() and (m.sum(-1) <= 1 + 1e-5).all()  # the rest of each query's attention: the image
    assert all(b.record is None for b in blocks)  # the recording is switched off again
    with pytest.raises(ValueError, match="imagen"):
        seeded_stage("decoder", **DECODER).text_attention(x_t, t, list(captions))


def test_grounding_share_benchmark_prints_each_models_shares(tmp_path, capsys):
    import json

    from benchmarks.grounding_share import main
    from bundle_helpers import small_bundle
    from cascade.bundle import save_stage, write_manifest

    bundle = tmp_path / "imagen"
    save_stage(seeded_stage("decoder", **IMAGEN), bundle / "decoder")
    write_manifest(bundle)
    assert main(["--model", f"tiny={bundle}", "--scenes", "3", "--t", "100,900"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    scores = line["models"]["tiny"]
    assert line["scenes"] == 3 and line["bench"] == "grounding_share"
    assert {"colour_shape@t100", "colour_shape@t900", "even"} <= set(scores)
    assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k != "seconds")
    assert main(["--model", str(small_bundle(tmp_path / "unclip"))]) == 2
    assert "not Imagen-style" in capsys.readouterr().err
    assert main(["--model", str(bundle), "--t", "1000"]) == 2
    assert "timesteps must be in [0, 1000)" in capsys.readouterr().err


def test_grounding_cost_benchmark_times_the_step_with_and_without_the_term(tmp_path, capsys):
    import json

    import cascade.nn.attention as attention

    from benchmarks.grounding_cost import main

    threads = torch.get_num_threads()
    try:
        assert main(["--runs", "1", "--batches", "1", "--batch-size", "2", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the process's threads
    line = json.loads(capsys.readouterr().out.strip())
    assert line["bench"] == "grounding_cost" and line["steps_each"] == 1
    assert line["ms_per_step_on"] > 0 and line["ms_per_step_off"] > 0
    assert line["ratio"] == pytest.approx(line["ms_per_step_on"] / line["ms_per_step_off"], rel=0.01)
    assert line["ms_per_step_explicit"] > 0 and line["explicit_over_fused"] > 0
    assert attention._FUSED_SHARES_FROM == 256  # the benchmark puts the threshold back
    plain = tmp_path / "plain.yaml"
    plain.write_text((ROOT / "configs/levers/decoder-imagen-ungrounded.yaml").read_text())
    assert main(["--config", str(plain)]) == 2
    assert "grounding_loss set" in capsys.readouterr().err
    assert main(["--runs", "0"]) == 2


def test_drop_colours_cuts_the_chosen_objects_colour_words_and_the_spans_follow(tokenizer):
    scene = {"objects": [{"color": "red", "shape": "star", "cell": [0, 0]},
                         {"color": "red", "shape": "circle", "cell": [2, 2]}]}
    caption = "a big red star at the top left and a small red circle at the bottom right on a red background"
    text, dropped = drop_colours(caption, scene, [True, False])
    assert text == "a big star at the top left and a small red circle at the bottom right on a red background"
    assert dropped["objects"][0]["colour_in_caption"] is False and "colour_in_caption" not in scene["objects"][0]
    spans = object_token_spans(text, dropped, places=True)
    assert [[text[a:b] for a, b in obj] for obj in spans] == [["star", "top left"], ["red", "circle", "bottom right"]]
    assert drop_colours(caption, scene, [False, False]) == (caption, scene)
    assert drop_colours("a grinning face", {"source": "emoji"}, [True]) == ("a grinning face", {"source": "emoji"})
    # every phrasing of real scenes: the dropped objects' tokens are their shape word alone, the others' unchanged
    gen = torch.Generator().manual_seed(0)
    captions, scenes, kept = [], [], []
    for i in range(300):
        caption, scene = scene_for(0, i)
        drop = (torch.rand(len(scene["objects"]), generator=gen) < 0.5).tolist()
        text, new = drop_colours(caption, scene, drop)
        assert len(text) == len(caption) - sum(len(o["color"]) + 1 for o, d in zip(scene["objects"], drop) if d)
        captions.append(text), scenes.append(new), kept.append(drop)
    ids = tokenizer(captions, truncation=True, max_length=48)["input_ids"]
    for caption, scene, sample, row, drop in zip(captions, scenes, grounding_targets(captions, scenes, tokenizer, 48),
                                                  ids, kept):
        assert [k for _, k in sample] == list(range(len(scene["objects"]))), caption
        for tokens, k in sample:
            obj = scene["objects"][k]
            words = tokenizer.convert_ids_to_tokens([row[j - 1] for j in tokens])
            assert words == ([obj["shape"]] if drop[k] else [obj["color"], obj["shape"]]), caption


def test_the_decoder_reads_captions_without_dropped_colours_only_in_training():
    from cascade.config import ConfigError
    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render
    from decoder.config import DecoderConfig

    captions, scenes = zip(*[scene_for(0, i) for i in range(8)])
    batch = {"image_64": torch.stack([image_to_tensor(render(s, 64)) for s in scenes]), "txt": list(captions),
             "json": list(scenes)}
    stage = seeded_stage("decoder", **IMAGEN, p_drop_colour=1.0, grounding_loss=0.5)
    read = []
    encode = stage.encode_text
    stage.encode_text = lambda texts: read.append(list(texts)) or encode(texts)
    stage.train()
    loss = stage.loss(batch)
    assert torch.isfinite(loss)
    loss.backward()  # the grounding term runs on the shape tokens alone
    assert read[-1] == [drop_colours(c, s, [True] * 3)[0] for c, s in zip(captions, scenes)]
    assert batch["txt"] == list(captions) and "colour_in_caption" not in str(batch["json"])  # the batch untouched
    stage.eval()
    stage.loss(batch)
    assert read[-1] == list(captions)  # evaluation reads the captions as they are
    with pytest.raises((ValueError, ConfigError), match="conditioning: imagen"):
        DecoderConfig(p_drop_colour=0.2)

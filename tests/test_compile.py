"""`Stage.compile_networks` and `train.compile`: torch.compile changes neither the results (loss,
gradients and samples equal eager's up to rounding) nor the parameter names, so checkpoints and bundles
written by a compiled run load into an uncompiled stage.

The equality tests trace with the "aot_eager" backend (TorchDynamo and AOTAutograd, no code generation),
which needs no C++ compiler; the engine run compiles with the default backend (inductor) and is skipped
where that cannot build its kernels.
"""
from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from cascade.errors import UserError
from bundle_helpers import small_batch
from cascade.registry import get_stage
from training_helpers import TinyAE, read_jsonl, write_config, write_shards

SMALL = {
    "prior": dict(embed_dim=8, token_dim=8, max_text_len=4, width=16, depth=2, heads=2),
    "decoder": dict(image_size=32, clip_dim=8, text_dim=8, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[8], head_dim=16, patch_size=2, text_layers=1),
    "sr256": dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1], text=True, text_dim=8, head_dim=8),
}


@functools.cache
def inductor_missing() -> str | None:
    """Why torch.compile's default backend cannot compile on this machine, or None when it can."""
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.ones(3))
    except Exception as err:  # noqa: BLE001 - any failure to build is a reason to skip
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return f"torch.compile's inductor backend cannot compile here ({type(err).__name__}: {first})"
    return None


def needs_inductor():
    reason = inductor_missing()
    if reason:
        pytest.skip(reason)


def _pair(name: str):
    """An eager and a to-be-compiled stage holding the same weights (off the zero-initialised output
    layers, so every gradient is non-zero)."""
    cls = get_stage(name)
    torch.manual_seed(0)
    eager = cls(cls.Config(**SMALL[name], steps=2))
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compiled = cls(cls.Config(**SMALL[name], steps=2))
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _loss_and_grads(stage, batch):
    stage.train()
    torch.manual_seed(1)
    loss = stage.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in stage.named_parameters()}


@pytest.mark.parametrize("name", ["prior", "decoder", "sr256"])
def test_compiling_keeps_every_parameter_name(name):
    eager, compiled = _pair(name)
    compiled.compile_networks(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    eager.load_state_dict(compiled.state_dict(), strict=True)  # and a compiled stage's weights load eagerly


@pytest.mark.parametrize("name", ["prior", "decoder", "sr256"])
def test_a_compiled_stage_has_the_eager_loss_and_gradients(name, one_thread):
    eager, compiled = _pair(name)
    compiled.compile_networks(backend="aot_eager")
    batch = small_batch(name)
    loss, grads = _loss_and_grads(eager, batch)
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss_c, loss)
    assert grads_c.keys() == grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grads_c[key], grad, msg=key)


@pytest.mark.slow  # tracing the sampling loop's steps takes 20-40 s on this CPU
def test_a_compiled_decoder_samples_the_eager_images_and_checkpoints_compile_too(one_thread):
    eager, compiled = _pair("decoder")
    compiled.compile_networks(backend="aot_eager")
    cond = {k: v[:2] for k, v in small_batch("decoder").items() if k != "image_32"}
    out = eager.eval().sample(cond, guidance=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled.eval().sample(cond, guidance=2.0, generator=torch.Generator().manual_seed(0)),
                               out)
    # Gradient checkpointing inside the compiled networks.
    recomputing = get_stage("decoder")(get_stage("decoder").Config(**SMALL["decoder"], gradient_checkpointing=True))
    recomputing.load_state_dict(eager.state_dict())
    recomputing.compile_networks(backend="aot_eager")
    loss, grads = _loss_and_grads(eager, small_batch("decoder"))
    loss_r, grads_r = _loss_and_grads(recomputing, small_batch("decoder"))
    torch.testing.assert_close(loss_r, loss)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_r[key], grad, msg=key)


@pytest.mark.slow
def test_an_inductor_compiled_decoder_has_the_eager_loss_and_gradients(one_thread):
    needs_inductor()
    eager, compiled = _pair("decoder")
    compiled.compile_networks()
    loss, grads = _loss_and_grads(eager, small_batch("decoder"))
    loss_c, grads_c = _loss_and_grads(compiled, small_batch("decoder"))
    torch.testing.assert_close(loss_c, loss)
    for key, grad in grads.items():
        torch.testing.assert_close(grads_c[key], grad, msg=key)


def test_a_stage_without_networks_to_compile_says_so(tmp_path, monkeypatch):
    from cascade.training.engine import TrainArgs, train

    from cascade.config import Config
    from cascade.stage import Stage

    with pytest.raises(NotImplementedError, match="names no networks to compile"):
        Stage(Config()).compile_networks()
    monkeypatch.setattr(TinyAE, "networks", ())
    data = write_shards(tmp_path / "data", train=8, val=0)
    cfg = write_config(tmp_path / "c.yaml", max_steps=1, compile=True)
    with pytest.raises(UserError, match="train.compile is set but the test_tiny_ae stage has no networks"):
        train(TrainArgs(stage="test_tiny_ae", config=cfg, data=data, run_dir=tmp_path / "run"))


def test_a_resume_may_switch_compile_and_gradient_checkpointing(tmp_path):
    from cascade.training import run_dir as run_dirs
    from cascade.training.config import RunConfig, TrainConfig
    from decoder import DecoderConfig

    run = RunConfig("decoder", DecoderConfig(), TrainConfig(batch_size=4, lr=1e-3, max_steps=10), "a.yaml")
    run_dirs.claim(tmp_path, run.as_dict(), "a.yaml", write=True, defaults=run.defaults())
    switched = run.as_dict()
    switched["model"]["gradient_checkpointing"] = switched["train"]["compile"] = True
    run_dirs.claim(tmp_path, switched, "b.yaml", write=False, defaults=run.defaults())  # raises if refused
    # A setting that shapes the weights is still refused, so the claim above does check something.
    other = run.as_dict()
    other["train"]["lr"] = 2e-3
    with pytest.raises(UserError, match="train.lr: 0.001 -> 0.002"):
        run_dirs.claim(tmp_path, other, "c.yaml", write=False, defaults=run.defaults())
    # A run recorded before the options existed resumes too (they count as their defaults, off).
    old = json.loads((tmp_path / "run.json").read_text())
    del old["model"]["gradient_checkpointing"], old["train"]["compile"]
    (tmp_path / "run.json").write_text(json.dumps(old))
    run_dirs.claim(tmp_path, switched, "b.yaml", write=False, defaults=run.defaults())
    assert json.loads((tmp_path / "run.json").read_text()) == old  # checked, not rewritten


def test_a_compiled_training_run_matches_eager_and_its_checkpoint_and_export_load_uncompiled(tmp_path, monkeypatch):
    from cascade.bundle import load_stage
    from cascade.training.engine import TrainArgs, train

    needs_inductor()
    compiled = []
    real = TinyAE.compile_networks
    monkeypatch.setattr(TinyAE, "compile_networks", lambda self, **kw: compiled.append(self) or real(self, **kw))
    data = write_shards(tmp_path / "data", train=16, val=0)
    runs = {}
    for compile_ in (False, True):
        cfg = write_config(tmp_path / f"{compile_}.yaml", max_steps=2, log_every=1, eval_at_end=False,
                           compile=compile_)
        result = train(TrainArgs(stage="test_tiny_ae", config=cfg, data=data, run_dir=tmp_path / f"run-{compile_}",
                                 export=tmp_path / f"bundle-{compile_}"))
        assert result.step == 2
        runs[compile_] = read_jsonl(tmp_path / f"run-{compile_}" / "metrics.jsonl")
    assert len(compiled) == 1 and compiled[0].encode._compiled_call_impl is not None  # the compiled run's only
    assert [r["loss"] for r in runs[True]] == pytest.approx([r["loss"] for r in runs[False]], rel=1e-4)

    last = tmp_path / "run-True" / "checkpoints" / "step-000002"
    weights = load_file(str(last / "weights.safetensors"))
    plain = TinyAE(TinyAE.Config())
    assert set(weights) == set(plain.state_dict())
    plain.load_state_dict(weights, strict=True)
    stage = load_stage(tmp_path / "bundle-True" / "test_tiny_ae")
    ema = load_file(str(last / "ema.safetensors"))
    for name, value in ema.items():
        torch.testing.assert_close(stage.state_dict()[name], value, rtol=0, atol=0)
    reference = load_stage(tmp_path / "bundle-False" / "test_tiny_ae")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(stage(x), reference(x), rtol=1e-4, atol=1e-5)

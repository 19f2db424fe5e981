"""`--dry-run` memory estimates (cascade.memory_estimate): the ZeRO closed form, parameter counts of stages
built on meta, activations measured on meta against a real backward, and the two commands."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cascade.memory_estimate import (ParamCounts, build_on_meta, count_params, estimate_training, example_batch,
                                     training_activation_bytes, training_rows)
from cascade.errors import UserError
from cascade.registry import get_stage
from cascade.training.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
TINY_DECODER = dict(clip_dim=32, text_dim=48, channels=16, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[16], head_dim=8, patch_size=2)


def _rows(counts, **kw):
    kw.setdefault("reduce_bucket_size", 50)
    return {(r.zero_stage, r.offload): r for r in training_rows(counts, 1000, **kw)}


def test_zero_closed_form_bf16():
    # P = T = 1000 parameters, the largest module holds 100; activations 1000 bytes
    counts = ParamCounts(total=1000, trainable=1000, largest_module=100)
    one = _rows(counts)
    z0 = one[(0, "none")]
    # ZeRO-0: 2 (bf16 weights) + 2 (bf16 grads) + 12 (fp32 master, m, v) bytes per parameter, + EMA 4
    assert (z0.params, z0.grads, z0.optimizer, z0.gathered, z0.ema, z0.cpu) == (2000, 2000, 12000, 0, 4000, 0)
    assert z0.gpu == 16 * 1000 + 4000 + 1000
    # on one GPU, partitioning changes nothing but DeepSpeed's reduction bucket (reduce_bucket_size bf16
    # gradients) and ZeRO-3's gathered module (4 bytes per parameter)
    assert one[(2, "none")].buckets == one[(3, "none")].buckets == 2 * 50
    assert one[(2, "none")].gpu == z0.gpu + 100 and one[(3, "none")].gpu == z0.gpu + 100 + 400
    assert _rows(counts, overlap_comm=True)[(2, "none")].buckets == 2 * 2 * 50  # ZeRO-2 double-buffers
    assert _rows(counts, contiguous_gradients=False)[(3, "none")].buckets == 0
    assert training_rows(counts, 0)[1].buckets == 2 * 500_000_000  # DeepSpeed's default size
    four = _rows(counts, gpus=4)
    z2, z3 = four[(2, "none")], four[(3, "none")]
    assert (z2.params, z2.grads, z2.optimizer) == (2000, 500, 3000)  # 2P + (2 + 12) T / N
    assert (z3.params, z3.grads, z3.optimizer, z3.gathered) == (500, 500, 3000, 400)  # 16 P / N
    # offload moves each rank's optimizer partition to the CPU with the fp32 gradient partition it steps with
    # (ZeRO-2: 4 + 12 bytes per parameter over N; ZeRO-3 keeps its bf16 gradient partition there too: 18)
    assert (four[(2, "optimizer")].grads, four[(2, "optimizer")].cpu) == (0, 4 * (1000 + 3000))
    off = four[(3, "optimizer")]
    assert (off.grads, off.optimizer, off.cpu) == (0, 0, 4 * (500 + 1000 + 3000))
    both = four[(3, "optimizer+params")]  # and the weights' partitions
    assert (both.params, both.cpu) == (0, 4 * (500 + 500 + 1000 + 3000))
    assert all(r.ema == 4000 and r.activations == 1000 for r in four.values())  # rank 0's whole EMA, per-GPU batch


def test_zero_closed_form_fp32_and_frozen_parameters():
    counts = ParamCounts(total=1000, trainable=600, largest_module=100)
    rows = _rows(counts, precision="fp32")
    # fp32 without ZeRO: weights 4, grads 4, Adam m and v 8 (torch's AdamW steps the weights themselves)
    assert (rows[(0, "none")].params, rows[(0, "none")].grads, rows[(0, "none")].optimizer) == (4000, 2400, 4800)
    # ZeRO keeps an fp32 copy of its partition all the same: 12 bytes per trainable parameter
    assert rows[(2, "none")].optimizer == 7200 and rows[(3, "none")].gathered == 800


def test_bad_gpu_count_is_a_user_error():
    from cascade.errors import UserError

    with pytest.raises(UserError, match="--gpus"):
        training_rows(ParamCounts(1, 1, 1), 0, gpus=0)


def test_parameter_counts_match_the_real_stage():
    run = load_run_config(ROOT / "configs/tiny/decoder.yaml")
    meta = build_on_meta("decoder", run.model)
    assert next(meta.parameters()).is_meta
    real = get_stage("decoder")(run.model)
    assert count_params(meta).total == sum(p.numel() for p in real.parameters())
    assert count_params(meta).largest_module == max(sum(p.numel() for p in m.parameters(recurse=False))
                                                    for m in real.modules())


def test_trainable_counts_leave_frozen_parameters_out():
    from training_helpers import TinyAE, TinyAEConfig

    counts = count_params(TinyAE(TinyAEConfig(width=8)))
    assert counts.total - counts.trainable == 2 * 2 + 2  # the frozen Linear(2, 2)


def _saved_tensor_bytes(stage, batch) -> int:
    """Bytes of the distinct storages autograd saves for backward during a real loss (weights left out),
    plus the batch: an independent measurement of what training holds at its peak."""
    weights = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = stage.loss(batch)
    loss.backward()
    return sum(saved.values()) + sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))


@pytest.mark.parametrize("name,model,batch_size", [
    ("decoder", TINY_DECODER, 8),
    ("sr256", dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=[1, 1], train_crop=64), 4),
    ("prior", dict(embed_dim=32, token_dim=48, max_text_len=16, width=64, depth=2, heads=4), 32),
])
def test_activations_on_meta_match_a_real_fp32_backward(name, model, batch_size):
    cls = get_stage(name)
    config = cls.Config(**model)
    estimate = training_activation_bytes(build_on_meta(name, config), example_batch(build_on_meta(name, config),
                                                                                    batch_size))
    torch.manual_seed(0)
    real = cls(config).train()
    batch = example_batch(real, batch_size, "cpu", torch.Generator().manual_seed(0))
    measured = _saved_tensor_bytes(real, batch)
    assert abs(estimate - measured) / measured < 0.15, (estimate, measured)


def test_activations_grow_with_the_batch_and_halve_in_bf16():
    config = get_stage("decoder").Config(**TINY_DECODER)
    stage = build_on_meta("decoder", config)
    small, large = (training_activation_bytes(stage, example_batch(stage, b)) for b in (4, 16))
    assert 3.5 < large / small <= 4.0
    half = training_activation_bytes(stage.to(torch.bfloat16), example_batch(stage, 16))
    assert 0.45 < half / large < 0.65  # the diffusion maths and the batch stay fp32


def _run_script(args, timeout=120):
    """train_stage.py in a child process that reports its own peak RSS (bytes) on its last stderr line: VmHWM,
    which starts afresh at exec, where ru_maxrss would also count the test process's own peak (subprocess
    starts the child with vfork, so exec leaves the parent's high-water mark in it)."""
    code = ("import sys; sys.path.insert(0, '.'); from train_stage import main; rc = main(sys.argv[1:]); "
            "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')); "
            "print(int(hwm.split()[1]) * 1024, file=sys.stderr); sys.exit(rc)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - start


def test_train_stage_dry_run_on_the_dalle2_decoder_allocates_nothing():
    proc, seconds = _run_script(["--stage", "decoder", "--config", "configs/dalle2/decoder.yaml", "--dry-run",
                                 "--json", "--gpus", "8", "--deepspeed_config", "configs/deepspeed/zero3.json"])
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)
    params = est["params"]["total"]
    assert 3.2e9 < params < 3.5e9 and est["batch_size"] == 2048 and est["gpus"] == 8
    assert est["deepspeed_config"] == {"zero_stage": 3, "offload": "none"}
    z3 = next(r for r in est["rows"] if (r["zero_stage"], r["offload"]) == (3, "none"))
    assert z3["params"] == pytest.approx(2 * params / 8, abs=1) and z3["activations"] > 100 * 2**30
    peak_rss = int(proc.stderr.strip().splitlines()[-1])
    assert peak_rss < 0.1 * 4 * params  # a tenth of the fp32 weights: nothing was allocated
    assert seconds < 20


def test_train_stage_dry_run_prints_a_table(capsys):
    from train_stage import main

    assert main(["--stage", "prior", "--config", str(ROOT / "configs/tiny/prior.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    real = sum(p.numel() for p in get_stage("prior")(load_run_config(ROOT / "configs/tiny/prior.yaml").model)
               .parameters())
    assert f"{real:,} parameters" in out
    assert out.count("optimizer+params") == 1 and "max batch (80 GiB)" in out


@pytest.mark.parametrize("args,message", [
    (["--stage", "decoder", "--config", "configs/tiny/nope.yaml"], "config file not found"),
    (["--stage", "decoder", "--config", "configs/tiny/decoder.yaml", "--gpus", "0"], "--gpus must be at least 1"),
    (["--stage", "prior", "--config", "configs/tiny/decoder.yaml"], "--stage is 'prior'"),
    (["--stage", "decoder", "--config", "configs/tiny/decoder.yaml", "--deepspeed_config", "nope.json"],
     "DeepSpeed config not found"),
])
def test_train_stage_dry_run_mistakes_exit_2_with_one_line(args, message, capsys, monkeypatch):
    from train_stage import main

    monkeypatch.chdir(ROOT)
    assert main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_stage.py: error:") and message in err


def test_generate_dry_run_on_a_small_bundle(tmp_path, capsys):
    from cascade.cli import main
    from tests.bundle_helpers import small_bundle

    bundle = small_bundle(tmp_path / "bundle")
    assert main(["generate", "--prompt", "a red circle", "--model", str(bundle), "--dry-run", "--json",
                 "--num-images", "2", "--until", "sr256", "--out", str(tmp_path / "out")]) == 0
    est = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "out").exists()
    assert [s["name"] for s in est["stages"]] == ["clip", "prior", "decoder", "sr256"]
    from cascade.bundle import load_stage

    for s in est["stages"]:
        if s["name"] != "clip":
            assert s["params"] == sum(p.numel() for p in load_stage(bundle / s["name"]).parameters())
    decoder = next(s for s in est["stages"] if s["name"] == "decoder")
    assert decoder["batch"] == 4 and decoder["activations"]["float32"] > decoder["activations"]["bfloat16"] > 0
    rows = {(r["dtype"], r["offload"]): r for r in est["rows"]}
    assert rows[("float32", "model")]["gpu"] < rows[("float32", "none")]["gpu"]
    assert rows[("bfloat16", "none")]["gpu"] < rows[("float32", "none")]["gpu"]
    weights = sum(s["params"] for s in est["stages"]) * 4
    assert rows[("float32", "none")]["gpu"] == weights + max(s["activations"]["float32"] for s in est["stages"])


def test_generate_dry_run_from_configs_prints_tables(capsys, monkeypatch):
    from cascade.cli import main

    monkeypatch.chdir(ROOT)
    configs = [f"configs/tiny/{n}.yaml" for n in ("clip", "prior", "decoder")]
    assert main(["generate", "--prompt", "x", "--dry-run", "--until", "decoder", "--config", *configs]) == 0
    out = capsys.readouterr().out
    assert "bfloat16  model" in out and "configs/tiny/decoder.yaml" in out
    assert main(["generate", "--prompt", "x", "--dry-run", "--config", *configs]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no sr256, sr1024" in err


def test_dry_run_of_a_mid_size_config_written_on_the_fly(tmp_path):
    data = yaml.safe_load((ROOT / "configs/tiny/decoder.yaml").read_text())
    data["model"].update(channels=64)
    data["train"]["batch_size"] = 4
    path = tmp_path / "decoder.yaml"
    path.write_text(yaml.safe_dump(data))
    est = estimate_training(path, "decoder", gpus=2)
    assert est.params.total > 4 * 4_768_716 * 0.9  # twice the width: about four times the weights
    z0, z3 = est.rows[0], est.rows[3]
    assert (z0.zero_stage, z3.zero_stage) == (0, 3) and z3.params == z0.params // 2
    assert z3.gpu - z3.buckets < z0.gpu and z3.activations == z0.activations


def test_an_imagen_style_decoder_counts_its_frozen_text_encoder(capsys):
    """The frozen MiniLM is not in the decoder's parameters (never trained or saved) but sits on the GPU:
    its count (from its config on meta) equals the loaded model's, and every row carries its fp32 weights."""
    from cascade.encoders.frozen_text import frozen_text_encoder
    from cascade.memory_estimate import estimate_inference, estimate_training, inference_stage_configs
    from train_stage import main

    config = ROOT / "configs/tiny/decoder-imagen.yaml"
    est = estimate_training(config)
    loaded = sum(p.numel() for p in frozen_text_encoder("minilm_l6", 48).model.parameters())
    assert est.frozen == loaded > 20e6
    plain = estimate_training(ROOT / "configs/tiny/decoder.yaml")
    assert plain.frozen == 0 and all(r.frozen == 0 for r in plain.rows)
    assert all(r.frozen == 4 * loaded and r.gpu > 4 * loaded for r in est.rows)
    assert main(["--stage", "decoder", "--config", str(config), "--dry-run"]) == 0
    assert f"plus the frozen text encoder's {loaded:,}" in capsys.readouterr().out
    stages = inference_stage_configs(configs=[ROOT / "configs/tiny/clip.yaml", config], until="decoder")
    assert list(stages) == ["clip", "decoder"]  # text -> decoder: no prior
    inf = estimate_inference(stages, num_images=1)
    decoder = next(s for s in inf["stages"] if s["name"] == "decoder")
    assert decoder["frozen"] == loaded
    none = next(r for r in inf["rows"] if (r["dtype"], r["offload"]) == ("bfloat16", "none"))
    weights = sum(s["params"] * (4 if s["name"] == "clip" else 2) for s in inf["stages"]) + 4 * loaded
    assert none["gpu"] == weights + max(s["activations"]["bfloat16"] for s in inf["stages"])


def test_an_imagen_style_step_does_not_count_building_its_frozen_encoder(monkeypatch):
    """The frozen encoder is built on first use. In a fresh process that was inside the first measured
    sampling step (fp32), which then showed its 87 MiB of weights as activations, 12x the bf16 step."""
    from cascade.encoders import frozen_text
    from cascade.memory_estimate import estimate_inference, inference_stage_configs

    monkeypatch.setattr(frozen_text, "_SHARED", {})  # as in a fresh process: nothing built yet
    stages = inference_stage_configs(configs=[ROOT / "configs/tiny/clip.yaml", ROOT / "configs/tiny/decoder-imagen.yaml"],
                                     until="decoder")
    decoder = next(s for s in estimate_inference(stages, num_images=2)["stages"] if s["name"] == "decoder")
    fp32, bf16 = decoder["activations"]["float32"], decoder["activations"]["bfloat16"]
    assert fp32 < 4 * decoder["frozen"] / 2  # far below the encoder's fp32 weights
    assert 1.5 * bf16 <= fp32 <= 2.5 * bf16  # activations scale with the element size


def test_an_imagen_style_chain_needs_no_clip_config_but_an_unclip_one_does():
    from cascade.memory_estimate import inference_stage_configs

    tiny = ROOT / "configs/tiny"
    stages = inference_stage_configs(configs=[tiny / "decoder-imagen.yaml", tiny / "sr256.yaml"], until="sr256")
    assert list(stages) == ["decoder", "sr256"]  # nothing in text -> decoder -> sr256 reads CLIP
    with pytest.raises(UserError, match="--config gave no clip"):
        inference_stage_configs(configs=[tiny / "prior.yaml", tiny / "decoder.yaml"], until="decoder")

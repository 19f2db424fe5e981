"""The device and dtype policy (`cascade.devices`) and the pipeline on the device and dtype asked for.

The device is a parameter: `CASCADE_TEST_DEVICE=cuda pytest -m "not slow"` runs the same tests on a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cascade.devices import resolve_device, resolve_dtype
from cascade.errors import UserError

DEVICE = torch.device(os.environ.get("CASCADE_TEST_DEVICE", "cpu"))


def test_auto_picks_the_gpu_when_there_is_one_and_fp32_on_the_cpu():
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == want
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("name,needle", [("tpu", "use auto, cpu, cuda or cuda:N"), ("cuda:x", "use auto"),
                                         ("cuda:99", "CUDA GPU")])
def test_a_device_this_machine_lacks_is_a_one_line_error(name, needle):
    with pytest.raises(UserError, match=needle) as err:
        resolve_device(name)
    assert "\n" not in str(err.value)


def test_float16_on_the_cpu_and_unknown_dtypes_are_one_line_errors():
    with pytest.raises(UserError, match="float16 needs a GPU"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(UserError, match="use auto, float32, bfloat16, float16"):
        resolve_dtype("int8", torch.device("cpu"))


class _Placement(TorchDispatchMode):
    """Records every op whose floating-point output is not on `device` in `dtype` (or fp32, the dtype the
    diffusion maths run in). Noise is drawn on the CPU generator and copied over on purpose; the drawing
    ops and copies are not counted, nor the samplers' scalar bookkeeping."""

    ALLOWED = ("aten.randn", "aten.normal", "aten._to_copy", "aten.copy_", "aten.lift_fresh", "aten._local_scalar")

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.device, self.dtypes, self.wrong = device, {dtype, torch.float32}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0
                    and not name.startswith(self.ALLOWED)
                    and (t.device.type != self.device.type or t.dtype not in self.dtypes | {torch.float64})):
                self.wrong.append((name, t.device, t.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_runs_every_stage_on_the_device_and_dtype_asked_for(tmp_path, dtype):
    from bundle_helpers import small_bundle

    from cascade.pipeline import Cascade, Settings

    cascade = Cascade.from_bundle(small_bundle(tmp_path), device=DEVICE, dtype=dtype)
    for stage in cascade.stages.values():
        assert all(p.device.type == DEVICE.type and p.dtype == dtype for p in stage.parameters())
    settings = Settings(steps={"prior": 2, "decoder": 2, "sr256": 1})
    with _Placement(DEVICE, dtype) as seen:
        out = cascade.generate(["a red circle"], seed=3, until="sr256", settings=settings)
    assert not seen.wrong, sorted(set(seen.wrong))[:10]
    assert out.final.device.type == DEVICE.type and out.final.dtype == torch.float32
    assert torch.isfinite(out.final).all() and out.final.shape == (1, 3, 256, 256)
    again = cascade.generate(["a red circle"], seed=3, until="sr256", settings=settings)
    assert torch.equal(out.final, again.final)  # same seed, device and dtype: identical images


def test_the_cli_takes_device_and_dtype(tmp_path, capsys):
    from bundle_helpers import small_bundle

    from cascade.cli import main

    bundle = small_bundle(tmp_path)
    args = ["generate", "--prompt", "a red circle", "--model", str(bundle), "--num-images", "1", "--until",
            "decoder", "--steps", "prior=2,decoder=2", "--quiet", "--out", str(tmp_path / "o")]
    assert main(args + ["--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert len(capsys.readouterr().out.split()) == 2
    assert main(args + ["--device", "cuda:99"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offloaded_stages_make_the_same_images_and_live_off_the_device(tmp_path, offload):
    from bundle_helpers import small_bundle

    from cascade.pipeline import Cascade, Settings

    bundle = small_bundle(tmp_path)
    settings = Settings(steps={"prior": 2, "decoder": 2, "sr256": 1})
    plain = Cascade.from_bundle(bundle, device=DEVICE).generate(["a red circle"], seed=1, until="sr256",
                                                                 settings=settings)
    cascade = Cascade.from_bundle(bundle, device=DEVICE, offload=offload)
    out = cascade.generate(["a red circle"], seed=1, until="sr256", settings=settings)
    assert out.final.device.type == DEVICE.type
    for name in ("decoder", "sr256"):
        torch.testing.assert_close(out.images[name], plain.images[name], atol=1e-5, rtol=0)
    # Between samplings the weights are not on the device: in CPU memory (model), or not materialised at
    # all outside their own layer's call (sequential: accelerate keeps them on "meta", a CPU copy aside).
    held = {p.device.type for stage in cascade.stages.values() for p in stage.parameters()}
    assert held == ({"cpu"} if offload == "model" else {"meta"})


def test_an_unknown_offload_mode_is_a_one_line_error(tmp_path):
    from bundle_helpers import small_bundle

    from cascade.pipeline import Cascade

    with pytest.raises(UserError, match="--offload must be one of none, model, sequential"):
        Cascade.from_bundle(small_bundle(tmp_path), offload="disk")


def test_the_cli_compiles_every_stage_with_compile(tmp_path, capsys, monkeypatch):
    from bundle_helpers import small_bundle

    from cascade.cli import main
    from cascade.stage import Stage

    compiled = []
    monkeypatch.setattr(Stage, "compile_networks", lambda self, **kw: compiled.append(self.name))
    args = ["generate", "--prompt", "a red circle", "--model", str(small_bundle(tmp_path)), "--num-images", "1",
            "--until", "decoder", "--steps", "prior=1,decoder=1", "--quiet", "--out", str(tmp_path / "o")]
    assert main(args) == 0 and compiled == []
    assert main(args + ["--compile"]) == 0
    assert sorted(compiled) == ["decoder", "prior"]  # every stage it loads: those up to --until


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_object_guidance_runs_on_the_device_and_dtype_asked_for(tmp_path, dtype):
    """`generate(regions=)`: the objects' masks and their guidance terms live where the decoder does."""
    import shutil

    from bundle_helpers import seeded_stage, small_bundle
    from test_imagen_decoder import IMAGEN, LAYOUT, _awake

    from cascade.bundle import save_stage, write_manifest
    from cascade.pipeline import Cascade, Settings

    root = small_bundle(tmp_path)
    shutil.rmtree(root / "prior")
    shutil.rmtree(root / "decoder")
    save_stage(_awake(seeded_stage("decoder", **IMAGEN, steps=2)), root / "decoder")
    write_manifest(root)
    cascade = Cascade.from_bundle(root, ("decoder",), device=DEVICE, dtype=dtype)
    settings = Settings(steps={"decoder": 2})
    # first without: this also builds the frozen MiniLM (on the meta device, then loaded), outside the check
    plain = cascade.generate([LAYOUT, LAYOUT], seed=3, until="decoder", settings=settings)
    with _Placement(DEVICE, dtype) as seen:
        out = cascade.generate([LAYOUT, LAYOUT], seed=3, until="decoder", settings=settings, regions=2.0)
    assert not seen.wrong, sorted(set(seen.wrong))[:10]
    assert out.final.device.type == DEVICE.type and torch.isfinite(out.final).all()
    assert not torch.allclose(out.final, plain.final)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_grounding_loss_trains_on_the_device_and_dtype_asked_for(dtype):
    """`grounding_loss`: the recorded attention, the objects' masks and the term live where the decoder does,
    and its weights get finite gradients (bf16 weights as DeepSpeed casts them)."""
    from bundle_helpers import seeded_stage
    from test_grounding import IMAGEN

    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render, scene_for

    captions, scenes = zip(*[scene_for(0, i) for i in range(6)])
    batch = {"image_64": torch.stack([image_to_tensor(render(s, 64)) for s in scenes]), "txt": list(captions),
             "json": list(scenes)}
    decoder = seeded_stage("decoder", **IMAGEN, grounding_loss=1.0).to(DEVICE, dtype)
    decoder.loss(batch)  # builds the frozen MiniLM outside the check
    with _Placement(DEVICE, dtype) as seen:
        loss = decoder.loss(batch)
    assert not seen.wrong, sorted(set(seen.wrong))[:10]
    loss.backward()
    assert loss.device.type == DEVICE.type and torch.isfinite(loss)
    grads = [p.grad for p in decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

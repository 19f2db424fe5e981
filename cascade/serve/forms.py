"""The page's job requests -> checked pipeline calls.

A request is one JSON object: `kind` (generate, vary, img2img, interpolate, textdiff, inpaint), the
fields of that kind, and the sampling fields every kind shares (seed, until, sampler, per-stage steps
and guidance). Every value goes through the CLI's own checks (`cascade.cli`, `cascade.pipeline`), so a
mistake gets the same one-line message as on the command line, before the job is queued. The PNG text
chunks and file names are the ones the matching CLI command writes.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from cascade.errors import UserError
from cascade.registry import IMAGE_STAGES, SAMPLED_STAGES

KINDS = ("generate", "vary", "img2img", "interpolate", "textdiff", "inpaint")
SHARED = {"kind", "client", "seed", "until", "sampler", "steps", "guidance"}
FIELDS = {
    "generate": {"prompt", "negative_prompt", "num_images", "regions", "regions_share"},
    "vary": {"image", "negative_prompt", "num_images"},
    "img2img": {"image", "prompt", "negative_prompt", "strength", "num_images"},
    "interpolate": {"image", "image_b", "frames"},
    "textdiff": {"image", "from", "to", "frames", "max_theta"},
    "inpaint": {"image", "mask", "prompt", "negative_prompt", "num_images", "method", "resample"},
}
RANDOM_SEEDS = 2**32  # "random" draws a seed below this (short enough to read and type back)


@dataclass
class Spec:
    """A checked request: what to run and how to name and label its images."""

    kind: str
    stages: list[str]  # the stages it runs, in order (progress bars; the settings in the text chunks)
    call: Callable[..., Any]  # call(cascade, settings, progress) -> pipeline Result
    settings: Any  # cascade.pipeline.Settings
    text: dict[str, str]  # the PNG text chunks shared by its images (each adds "index")
    stem: str  # file names: <stem>-00.png, ...
    labels: list[str]  # one caption per image
    animated: bool = False  # frames of an animation (interpolate, textdiff): also an animated strip


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be a whole number, got {value!r}") from None


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return number


def _text(body: dict, name: str, *, optional: bool = False) -> str | None:
    from cascade.pipeline import check_prompt

    value = body.get(name)
    if optional and (value is None or (isinstance(value, str) and not value.strip())):
        return None
    if not isinstance(value, (str, type(None))):
        raise UserError(f"{name} must be text, got {value!r}")
    try:
        return check_prompt(value)
    except UserError as err:  # "the prompt is empty" -> "the negative_prompt is empty", ...
        raise UserError(str(err).replace("the prompt", f"the {name.replace('_', ' ')}", 1)) from None


def _seed(value: Any) -> int:
    from cascade.pipeline import check_seed

    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "random")):
        return secrets.randbelow(RANDOM_SEEDS)
    return check_seed(_int(value, "seed"), "seed")


def _per_stage(value: Any, name: str) -> str:
    """{"prior": 25, "decoder": ""} -> "prior=25" (blank: the stage's own), for the CLI's parser."""
    if value in (None, ""):
        return ""
    if not isinstance(value, dict):
        raise UserError(f"{name} must be an object of stage: value, e.g. {{\"decoder\": 4}}")
    parts = []
    for stage, v in value.items():
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if stage not in SAMPLED_STAGES:
            raise UserError(f"{name}: '{stage}' is not a stage; the stages are {', '.join(SAMPLED_STAGES)}")
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise UserError(f"{name} {stage}: '{v}' is not a number")
        parts.append(f"{stage}={v}")
    return ",".join(parts)


def _settings(body: dict):
    from cascade.cli import SAMPLER_CHOICES, sampling_settings

    sampler = body.get("sampler") or None
    if sampler is not None and sampler not in SAMPLER_CHOICES:
        raise UserError(f"sampler '{sampler}' is not one of {', '.join(SAMPLER_CHOICES)}")
    return sampling_settings(SimpleNamespace(sampler=sampler, eta=None, aug_level=None,
                                        steps=_per_stage(body.get("steps"), "steps"),
                                        guidance=_per_stage(body.get("guidance"), "guidance")))


def _count(body: dict, name: str, default: int, check: Callable[[SimpleNamespace], Any]) -> int:
    value = _int(body.get(name, default), name)
    check(SimpleNamespace(**{name: value}))
    return value


def parse(body: Any, *, cascade, gallery, model: str) -> Spec:
    """Check a request against the loaded cascade and the gallery; a one-line UserError otherwise."""
    from cascade.cli import INPUT_SIZE, check_frames, check_num_images, check_resample, slug
    from cascade.images import from_pil

    if not isinstance(body, dict):
        raise UserError("a job request is a JSON object")
    kind = body.get("kind")
    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    unknown = sorted(set(body) - SHARED - FIELDS[kind])
    if unknown:
        raise UserError(f"{kind} takes no field {', '.join(map(repr, unknown))}")

    until = body.get("until") or IMAGE_STAGES[-1]
    if until not in IMAGE_STAGES:
        raise UserError(f"until must be one of {', '.join(IMAGE_STAGES)}, not {until!r}")
    image_stages = list(cascade.stages_until(until))  # a UserError for a stage the bundle lacks
    seed = _seed(body.get("seed"))
    settings = _settings(body)

    def source(field: str, kinds=("result", "upload")):
        if not isinstance(body.get(field), str) or not body[field]:
            raise UserError(f"{kind} needs an image: upload one or use one from the gallery ({field})")
        return gallery.get(body[field], kinds=kinds)

    n = _count(body, "num_images", 1, check_num_images) if "num_images" in FIELDS[kind] else 0
    negative = _text(body, "negative_prompt", optional=True) if "negative_prompt" in FIELDS[kind] else None
    neg_text = {} if negative is None else {"negative_prompt": negative}
    common = {"seed": str(seed), "until": until}
    text_stages = [] if cascade.text_only else ["prior"]  # an Imagen-style decoder reads the prompt: no prior

    if kind == "generate":
        prompt = _text(body, "prompt")
        regions, layout = None, {}
        if body.get("regions") not in (None, ""):  # per-object guidance (an Imagen-style bundle)
            from cascade.cli import check_region_share, check_regions

            if not cascade.text_only:
                raise UserError("regions needs an Imagen-style bundle (its decoder reads the text itself)")
            regions = _float(body["regions"], "regions")
            layout = check_regions(regions, prompt, "regions")
            share = cascade.stages["decoder"].config.region_share  # the config's, unless the form sets one
            if body.get("regions_share") not in (None, ""):
                share = _float(body["regions_share"], "regions_share")
                check_region_share(share, f"regions_share {share:g}")
            layout["regions_share"] = f"{share:g}"
        elif body.get("regions_share") not in (None, ""):
            raise UserError("regions_share sets when per-object guidance runs: give regions too")
        per_object = {} if regions is None else {"regions": regions, "region_share": share}
        return Spec(kind, [*text_stages, *image_stages], settings=settings,
                    call=lambda c, s, p: c.generate([prompt] * n, seed=seed, until=until, settings=s, progress=p,
                                                    negative_prompt=negative, **per_object),
                    text={"prompt": prompt, **common, "model": model, **neg_text, **layout},
                    stem=f"{slug(prompt)}-s{seed}", labels=[prompt] * n)
    if kind == "vary":
        item = source("image")
        image = from_pil(item.image(), INPUT_SIZE)
        return Spec(kind, (["prior"] if negative else []) + image_stages, settings=settings,
                    call=lambda c, s, p: c.vary(image, num_images=n, seed=seed, until=until, settings=s, progress=p,
                                                negative_prompt=negative),
                    text={"source": item.name, **common, **neg_text},
                    stem=f"vary-{slug(Path(item.name).stem)}-s{seed}", labels=[f"variation {i}" for i in range(n)])
    if kind == "img2img":
        item = source("image")
        prompt = _text(body, "prompt")
        strength = _float(body.get("strength", 0.6), "strength")
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"strength {strength:g}: must be between 0 and 1 (0 keeps the image, 1 ignores it)")
        image = from_pil(item.image(), cascade.stages["decoder"].config.image_size)
        return Spec(kind, [*text_stages, *image_stages], settings=settings,
                    call=lambda c, s, p: c.img2img(image, prompt, strength=strength, num_images=n, seed=seed,
                                                   until=until, settings=s, progress=p, negative_prompt=negative),
                    text={"source": item.name, "prompt": prompt, "strength": f"{strength:g}", **common, "model": model,
                          **neg_text},
                    stem=f"img2img-{slug(prompt)}-st{strength:g}-s{seed}", labels=[prompt] * n)
    if kind == "interpolate":
        a, b = source("image"), source("image_b")
        frames = _count(body, "frames", 5, check_frames)
        images = [from_pil(x.image(), INPUT_SIZE) for x in (a, b)]
        ts = [i / (frames - 1) for i in range(frames)]
        return Spec(kind, image_stages, settings=settings, animated=True,
                    call=lambda c, s, p: c.interpolate(*images, frames=frames, seed=seed, until=until, settings=s,
                                                       progress=p),
                    text={"image_a": a.name, "image_b": b.name, "seed": str(seed)},
                    stem=f"interp-{slug(Path(a.name).stem)}-{slug(Path(b.name).stem)}-s{seed}",
                    labels=[f"t={t:.2f}" for t in ts])
    if kind == "textdiff":
        item = source("image")
        src, dst = _text(body, "from"), _text(body, "to")
        frames = _count(body, "frames", 5, check_frames)
        max_theta = _float(body.get("max_theta", 0.5), "max_theta")
        if not 0 < max_theta <= 1:
            raise UserError(f"max_theta {max_theta:g}: must be above 0 and at most 1 (the fraction of the angle "
                            "from the image's embedding to the text diff)")
        image = from_pil(item.image(), INPUT_SIZE)
        thetas = [max_theta * i / (frames - 1) for i in range(frames)]
        return Spec(kind, image_stages, settings=settings, animated=True,
                    call=lambda c, s, p: c.textdiff(image, src, dst, frames=frames, max_theta=max_theta, seed=seed,
                                                    until=until, settings=s, progress=p),
                    text={"source": item.name, "from": src, "to": dst, "seed": str(seed)},
                    stem=f"textdiff-{slug(dst)}-s{seed}", labels=[f"theta={t:.2f}" for t in thetas])
    # inpaint
    item = source("image")
    mask_item = source("mask", kinds=("mask",))
    prompt = _text(body, "prompt")
    method = body.get("method") or None
    if method is not None and not isinstance(method, str):
        raise UserError(f"method must be replace or glide, got {method!r}")
    method = cascade.stages["decoder"].inpaint_method(method)
    resample = check_resample(_int(body.get("resample", 1), "resample"), "resample")
    pil = item.image()
    image = from_pil(pil)  # (3, S, S): uploads and results are square
    mask = torch.from_numpy(_mask_array(mask_item.image(), pil.width))[None]  # (1, S, S) in [0, 1]
    if not bool((mask >= 0.5).any()):
        raise UserError("the mask is empty: paint over the part of the image to redraw")
    extra = {"method": method, **({"resample": str(resample), "jump": "1"} if method == "replace" else {})}
    return Spec(kind, [*text_stages, *image_stages], settings=settings,
                call=lambda c, s, p: c.inpaint(image, mask, prompt, method=method, num_images=n, seed=seed,
                                               until=until, settings=s, progress=p, negative_prompt=negative,
                                               resample=resample),
                text={"source": item.name, "prompt": prompt, **extra, **common, "model": model, **neg_text},
                stem=f"inpaint-{slug(prompt)}-{method}-s{seed}", labels=[prompt] * n)


def default_inpaint_method(cascade) -> str:
    """What `cascade inpaint` uses without --method: glide where the decoder was trained for it."""
    decoder = cascade.stages.get("decoder")
    return "replace" if decoder is None else decoder.inpaint_method()


def _mask_array(mask, side: int):
    """The mask's grey levels resized to side x side, as float32 in [0, 1] (1 = repaint)."""
    import numpy as np
    from PIL import Image

    grey = mask.convert("L")
    if grey.size != (side, side):
        grey = grey.resize((side, side), Image.BILINEAR)
    return np.asarray(grey, dtype=np.float32) / 255.0

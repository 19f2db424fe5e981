"""The `cascade` command. `data` subcommands live with the data code and register here; the model
commands (generate, vary, img2img, inpaint, interpolate, textdiff, eval) drive `cascade.pipeline`. A `UserError`
anywhere becomes one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from cascade.errors import ArgumentParser, UserError, run_cli
from cascade.registry import EMBEDDING_JOBS, IMAGE_STAGES, SAMPLED_STAGES, image_stages_until

# cascade.diffusion.SAMPLERS, spelled out so that `--help` needs no torch import (a test keeps them equal)
SAMPLER_CHOICES = ("ddpm", "ddim", "dpmpp", "dpmpp_karras", "euler", "euler_a", "heun")

# What the demo builds, in the order a command without --model looks for them: `make demo` and `make
# demo-quick` build the Imagen-style system (the demo's default since it bound better, docs/results.md),
# `make demo-unclip` and `make demo-quick-unclip` the unCLIP one.
DEMO_BUNDLES = ("bundles/tiny-imagen", "bundles/tiny", "bundles/quick-imagen", "bundles/quick")
INPUT_SIZE = 256  # source images are centre-cropped square and resized to this before the CLIP image tower


# ---------------------------------------------------------------------------- option parsing
class _Once(argparse.Action):
    """A text option that a command takes once: argparse would keep the last of two `--prompt`s and drop
    the first without a word, so a second one is an error (a command draws one prompt: run it per prompt)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"argument {option_string}: given twice; it takes one text (run the command once "
                         f"for each)")
        setattr(namespace, self.dest, values)


def _per_stage(text: str, cast, option: str, stages: tuple[str, ...]) -> dict:
    """'prior=25,decoder=50' -> {"prior": 25, "decoder": 50}, with one-line errors."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in stages:
            raise UserError(f"{option} takes STAGE=VALUE pairs with STAGE in {', '.join(stages)}; got '{part}'")
        try:
            out[name] = cast(value)
        except ValueError:
            raise UserError(f"{option}: '{value}' is not a number (in '{part}')") from None
    return out


MAX_GUIDANCE = 50.0  # classifier-free guidance scales: the CLI, the web studio and the benchmarks share it


def check_guidance(w: float, name: str) -> float:
    if not 0.0 <= w <= MAX_GUIDANCE:  # NaN fails too
        raise UserError(f"{name}: guidance must be between 0 and {MAX_GUIDANCE:g}")
    return w


def check_region_share(share: float, name: str) -> float:
    """The share of the timesteps per-object guidance runs at (`region_share`): above 0, at most 1."""
    if not 0.0 < share <= 1.0:  # NaN fails too
        raise UserError(f"{name}: must be above 0 and at most 1 (1: every step)")
    return share


def check_regions(w: float, prompt: str, name: str) -> dict[str, str]:
    """Per-object guidance's checks before any model loads (the scale; a prompt with a layout, named or
    planned: `cascade.layout.region_cells`) -> the PNG text it adds: regions and, for a relation's planned
    layout, the prompt the decoder reads (layout_prompt)."""
    from cascade.layout import layout_prompt, region_cells

    check_guidance(w, f"{name} {w:g}")
    if region_cells(prompt) is None:
        raise UserError(f"{name} needs a prompt of two or more objects that names each one's cell after its shape "
                        "(\"a red star at the top left and a blue circle in the center\") or places two by a "
                        "relation (\"a red star above a blue circle\")")
    planned = layout_prompt(prompt)
    return {"regions": f"{w:g}", **({} if planned == prompt else {"layout_prompt": planned})}


def sampling_settings(args):
    from cascade.pipeline import Settings

    if args.eta is not None:
        if not 0 <= args.eta <= 1:
            raise UserError(f"--eta {args.eta}: must be between 0 and 1")
        if args.sampler not in (None, "ddim"):
            raise UserError(f"--eta is DDIM's noise; --sampler {args.sampler} does not use it")
    settings = Settings(sampler=args.sampler, aug_level=args.aug_level, eta=args.eta)
    for name, steps in _per_stage(args.steps or "", int, "--steps", SAMPLED_STAGES).items():
        if not 1 <= steps <= 1000:
            raise UserError(f"--steps {name}={steps}: steps must be between 1 and 1000")
        settings.steps[name] = steps
    for name, w in _per_stage(args.guidance or "", float, "--guidance", SAMPLED_STAGES).items():
        settings.guidance[name] = check_guidance(w, f"--guidance {name}={w}")
    for name, t in _per_stage(getattr(args, "t_min", "") or "", int, "--t-min", SAMPLED_STAGES).items():
        if t < 0:  # the upper end is the stage's timesteps, checked when it samples
            raise UserError(f"--t-min {name}={t}: must be 0 or more")
        settings.t_min[name] = t
    if settings.aug_level is not None and not 0.0 <= settings.aug_level <= 1.0:
        raise UserError(f"--aug-level {settings.aug_level}: must be between 0 and 1")
    return settings


def _prepare(args) -> None:
    """Check what a model command can check before loading any weights: the seed, that --out can be
    written, and which bundle to load (see `resolve_model`)."""
    from cascade.outputs import check_out_dir
    from cascade.pipeline import check_seed

    check_seed(args.seed, "--seed")
    check_out_dir(args.out)
    resolve_model(args)


def resolve_model(args) -> None:
    """--model, else $CASCADE_MODEL, else the first bundle of DEMO_BUNDLES the demo built (for vary,
    interpolate and textdiff the first unCLIP one); when the user gave no --model, one line on stderr says
    which bundle this run uses."""
    if args.model is not None:
        return
    if os.environ.get("CASCADE_MODEL"):
        args.model, why = os.environ["CASCADE_MODEL"], "from $CASCADE_MODEL"
    else:
        found = [b for b in DEMO_BUNDLES if (Path(b) / "cascade.json").is_file()]
        if not found:
            raise UserError(f"no --model given and no model bundle in {', '.join(DEMO_BUNDLES)}: make one with "
                            "`make demo-quick` (or `make demo`), or pass --model BUNDLE")
        command = getattr(args, "command", None)
        if command in EMBEDDING_JOBS:
            unclip = [b for b in found if _unclip_bundle(b)]
            if not unclip:
                raise UserError(f"{command} works on CLIP image embeddings, and the demo's bundle ({found[0]}) is "
                                "Imagen-style, which has none: make an unCLIP one with `make demo-quick-unclip` "
                                "(or `make demo-unclip`), or pass --model BUNDLE")
            found = unclip
        args.model, why = found[0], "the demo's bundle; pass --model to choose another"
    if os.environ.get("RANK", "0") == "0":
        print(f"cascade: using model {args.model} ({why})", file=sys.stderr)


def _unclip_bundle(bundle: str) -> bool:
    """Whether a demo bundle's decoder reads CLIP image embeddings; one whose decoder config cannot be read
    counts as one, and its load says what is wrong."""
    from cascade.bundle import decoder_text_only

    try:
        return not decoder_text_only(bundle)
    except UserError:
        return True


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "image"


# ---------------------------------------------------------------------------- model commands
def _load(args, *, prior: bool = True):
    """The bundle's clip and the stages this command runs: the prior if `prior`, then the image stages
    up to --until (a broken or missing later stage does not stop an earlier --until)."""
    from cascade.devices import resolve_device, resolve_dtype
    from cascade.pipeline import Cascade

    device = resolve_device(args.device)
    stages = (("prior",) if prior else ()) + image_stages_until(args.until)
    cascade = Cascade.from_bundle(args.model, stages, device=device, dtype=resolve_dtype(args.dtype, device),
                                  offload="none" if args.shard else args.offload)
    if args.compile:
        for stage in cascade.stages.values():
            stage.compile_networks()
    args.rank = 0
    if args.shard:
        from cascade.sharding import shard_cascade

        args.rank = shard_cascade(cascade, offload=args.offload != "none")
        args.quiet = args.quiet or args.rank != 0
    return cascade


def _stage_bars(args):
    """progress(stage, done, total) for the pipeline: one tqdm bar per stage on stderr, labelled with the
    stage and advancing per sampling step; None (no bars) with --quiet or on sharded ranks other than 0."""
    if args.quiet:
        return None
    from tqdm import tqdm

    bars = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f"{stage:<7}", unit="step", file=sys.stderr)
        bar = bars[stage]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _write(result, args, stem: str, text: dict[str, str], captions: list[str]) -> list[Path]:
    """One PNG per image and a grid, `<stem>-00.png`, ..., `<stem>-grid.png`; where an earlier run left
    any of those names, the whole set becomes `<stem>-2-*`, `<stem>-3-*`, ... unless --overwrite. No grid
    for one image over 256 px: it would carry no caption, so it would be a copy of the image (at 1024^2 a
    1.5 MB file and a tenth of a second)."""
    from cascade.images import make_grid, save_png
    from cascade.outputs import free_stem

    if getattr(args, "rank", 0) != 0:
        return []  # sharded runs: every rank computes, rank 0 writes
    out = Path(args.out)
    images = result.final
    captioned = images.shape[-1] <= 256  # larger tiles' grids carry no captions
    grid = len(images) > 1 or captioned
    if not args.overwrite:
        stem = free_stem(out, stem, [f"-{i:02d}.png" for i in range(len(images))] + ["-grid.png"] * grid)
    paths = []
    for i, image in enumerate(images):
        paths.append(save_png(image, out / f"{stem}-{i:02d}.png", {**text, "index": str(i)}))
    if grid:
        paths.append(save_png(make_grid(images, captions if captioned else None), out / f"{stem}-grid.png", text))
    for p in paths:
        print(p)
    return paths


def check_num_images(args) -> None:
    if not 1 <= args.num_images <= 64:
        raise UserError(f"--num-images {args.num_images}: must be between 1 and 64")


def _negative(args) -> str | None:
    """--negative-prompt, checked like a prompt, or None."""
    from cascade.pipeline import check_prompt

    value = getattr(args, "negative_prompt", None)
    return None if value is None else check_prompt(value)


def _negative_text(negative: str | None) -> dict[str, str]:
    return {} if negative is None else {"negative_prompt": negative}


def cmd_generate(args) -> int:
    from cascade.pipeline import check_prompt

    prompt = check_prompt(args.prompt)
    negative = _negative(args)
    check_num_images(args)
    settings = sampling_settings(args)
    if args.dry_run:
        from cascade.memory_estimate import generate_dry_run

        if not args.config:
            resolve_model(args)
        return generate_dry_run(args, settings)
    _prepare(args)
    regions, share = args.regions, args.regions_share
    if share is not None:
        if regions is None:
            raise UserError("--regions-share sets when --regions' per-object guidance runs: give --regions too")
        check_region_share(share, f"--regions-share {share:g}")
    layout = {} if regions is None else check_regions(regions, prompt, "--regions")
    cascade = _load(args)
    per_object = {} if regions is None else {"regions": regions, "region_share": share}
    result = cascade.generate([prompt] * args.num_images, seed=args.seed, until=args.until, settings=settings,
                              progress=_stage_bars(args), negative_prompt=negative, **per_object)
    if regions is not None:  # the share it ran at, for the PNG
        share = cascade.stages["decoder"].config.region_share if share is None else share
        layout["regions_share"] = f"{share:g}"
    text = {"prompt": prompt, "seed": str(args.seed), "until": args.until, "model": str(args.model),
            **_negative_text(negative), **settings.as_text(cascade.stages),
            **layout}
    _write(result, args, f"{slug(prompt)}-s{args.seed}", text, [prompt] * args.num_images)
    return 0


def cmd_vary(args) -> int:
    from cascade.images import read_image

    image = read_image(args.image, size=INPUT_SIZE)
    negative = _negative(args)
    check_num_images(args)
    settings = sampling_settings(args)
    _prepare(args)
    cascade = _load(args, prior=negative is not None)
    result = cascade.vary(image, num_images=args.num_images, seed=args.seed, until=args.until, settings=settings,
                          progress=_stage_bars(args), negative_prompt=negative)
    text = {"source": str(args.image), "seed": str(args.seed), "until": args.until, **_negative_text(negative),
            **settings.as_text(cascade.stages)}
    _write(result, args, f"vary-{slug(Path(args.image).stem)}-s{args.seed}", text,
           [f"variation {i}" for i in range(args.num_images)])
    return 0


def cmd_img2img(args) -> int:
    from cascade.images import read_image
    from cascade.pipeline import check_prompt

    prompt = check_prompt(args.prompt)
    negative = _negative(args)
    if not 0.0 <= args.strength <= 1.0:
        raise UserError(f"--strength {args.strength}: must be between 0 and 1 (0 keeps the image, 1 ignores it)")
    check_num_images(args)
    settings = sampling_settings(args)
    _prepare(args)
    cascade = _load(args)
    image = read_image(args.image, size=cascade.stages["decoder"].config.image_size)
    result = cascade.img2img(image, prompt, strength=args.strength, num_images=args.num_images, seed=args.seed,
                             until=args.until, settings=settings, progress=_stage_bars(args),
                             negative_prompt=negative)
    text = {"source": str(args.image), "prompt": prompt, "strength": f"{args.strength:g}", "seed": str(args.seed),
            "until": args.until, "model": str(args.model), **_negative_text(negative),
            **settings.as_text(cascade.stages)}
    _write(result, args, f"img2img-{slug(prompt)}-st{args.strength:g}-s{args.seed}", text,
           [prompt] * args.num_images)
    return 0


def _inpaint_inputs(args):
    """(image (3, S, S), mask (1, S, S)) from --image and --mask or --box, both centre-cropped square as
    every command crops its input, at the image's own size (the pipeline resizes both for each stage);
    one-line errors for a mask of another size or an empty one."""
    from cascade.images import read_image
    from cascade.masks import box_mask, center_square, check_mask, read_mask

    image = read_image(args.image)
    native = (image.shape[-1], image.shape[-2])
    mask = read_mask(args.mask, native) if args.mask is not None else box_mask(args.box, native)
    return center_square(image), check_mask(center_square(mask))


def cmd_inpaint(args) -> int:
    from cascade.pipeline import check_prompt

    prompt = check_prompt(args.prompt)
    negative = _negative(args)
    if (args.mask is None) == (args.box is None):
        raise UserError("give the region to repaint as either --mask PNG or --box x0,y0,x1,y1 (one of them)")
    check_resample(args.resample)
    if args.jump < 1:
        raise UserError(f"--jump {args.jump}: must be 1 or more")
    check_num_images(args)
    settings = sampling_settings(args)
    image, mask = _inpaint_inputs(args)
    _prepare(args)
    cascade = _load(args)
    result = cascade.inpaint(image, mask, prompt, method=args.method, num_images=args.num_images, seed=args.seed,
                             until=args.until, settings=settings, progress=_stage_bars(args),
                             negative_prompt=negative, resample=args.resample, jump=args.jump)
    method = cascade.stages["decoder"].inpaint_method(args.method)
    region = {"mask": str(args.mask)} if args.mask is not None else {"box": args.box}
    text = {"source": str(args.image), **region, "prompt": prompt, "method": method, "seed": str(args.seed),
            "until": args.until, "model": str(args.model), **_negative_text(negative),
            **({"resample": str(args.resample), "jump": str(args.jump)} if method == "replace" else {}),
            **settings.as_text(cascade.stages)}
    _write(result, args, f"inpaint-{slug(prompt)}-{method}-s{args.seed}", text, [prompt] * args.num_images)
    return 0


MAX_RESAMPLE = 50  # RePaint's resamplings per step: the CLI and the web studio share the bound


def check_resample(resample: int, name: str = "--resample") -> int:
    if not 1 <= resample <= MAX_RESAMPLE:
        raise UserError(f"{name} {resample}: must be between 1 and {MAX_RESAMPLE} (RePaint's resampling; 1 = none)")
    return resample


def check_frames(args) -> int:
    if not 2 <= args.frames <= 64:
        raise UserError(f"--frames {args.frames}: must be between 2 and 64")
    return args.frames


def cmd_interpolate(args) -> int:
    from cascade.images import read_image

    if len(args.image) != 2:
        raise UserError(f"interpolate takes exactly two --image options, got {len(args.image)}")
    a, b = (read_image(p, size=INPUT_SIZE) for p in args.image)
    frames = check_frames(args)
    settings = sampling_settings(args)
    _prepare(args)
    cascade = _load(args, prior=False)
    result = cascade.interpolate(a, b, frames=frames, seed=args.seed, until=args.until, settings=settings,
                                 progress=_stage_bars(args))
    text = {"image_a": args.image[0], "image_b": args.image[1], "seed": str(args.seed),
            **settings.as_text(cascade.stages)}
    stem = f"interp-{slug(Path(args.image[0]).stem)}-{slug(Path(args.image[1]).stem)}-s{args.seed}"
    _write(result, args, stem, text, [f"t={t:.2f}" for t in [i / (frames - 1) for i in range(frames)]])
    return 0


def cmd_textdiff(args) -> int:
    from cascade.images import read_image
    from cascade.pipeline import check_prompt

    image = read_image(args.image, size=INPUT_SIZE)
    src, dst = check_prompt(args.from_text), check_prompt(args.to_text)
    frames = check_frames(args)
    if not 0 < args.max_theta <= 1:
        raise UserError(f"--max-theta {args.max_theta}: must be above 0 and at most 1 (the fraction of the "
                        "angle from the image's embedding to the text diff)")
    settings = sampling_settings(args)
    _prepare(args)
    cascade = _load(args, prior=False)
    result = cascade.textdiff(image, src, dst, frames=frames, max_theta=args.max_theta, seed=args.seed,
                              until=args.until, settings=settings, progress=_stage_bars(args))
    text = {"source": str(args.image), "from": src, "to": dst, "seed": str(args.seed),
            **settings.as_text(cascade.stages)}
    thetas = [args.max_theta * i / (frames - 1) for i in range(frames)]
    _write(result, args, f"textdiff-{slug(dst)}-s{args.seed}", text, [f"theta={t:.2f}" for t in thetas])
    return 0


def _add_common(p: argparse.ArgumentParser, num_images: bool = False) -> None:
    p.add_argument("--model", default=None,
                   help="model bundle directory (default: $CASCADE_MODEL if set, else the bundle the demo "
                        "built: bundles/tiny-imagen, tiny, quick-imagen or quick, the first found; an unCLIP one "
                        "for vary, interpolate and textdiff)")
    p.add_argument("--out", default="out", help="output directory for the PNGs (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's files of the same names (default: name the new set "
                        "<stem>-2-*.png, <stem>-3-*.png, ...)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed, 0 to 2**63-1 (default: %(default)s); the same seed and settings give "
                        "identical pixels")
    p.add_argument("--until", choices=IMAGE_STAGES, default="sr1024",
                   help="last stage to run: decoder (64px), sr256 or sr1024 (default: %(default)s)")
    p.add_argument("--steps", default="", metavar="STAGE=N,...",
                   help="sampling steps per stage, e.g. prior=25,decoder=50,sr256=20,sr1024=10 (default: each "
                        "stage's config; those are the tiny configs' values)")
    p.add_argument("--guidance", default="", metavar="STAGE=W,...",
                   help="classifier-free guidance scale per stage, e.g. prior=4,decoder=3 (1 = none; default: "
                        "each stage's config; those are the shipped configs' values)")
    p.add_argument("--t-min", default="", metavar="STAGE=T,...",
                   help="timestep where sampling ends per stage, e.g. decoder=120: the last step returns the "
                        "network's estimate of the clean image from there instead of walking to step 0 "
                        "(default: each stage's config, 0 in most; docs/results.md, 'Where the quick decoder's "
                        "sampling stops')")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                   help="sampler for every stage: ddpm, ddim, dpmpp (DPM-Solver++(2M) on a log-SNR grid), "
                        "dpmpp_karras (the same on Karras et al.'s sigma grid), euler, euler_a (ancestral) or "
                        "heun (Karras et al. 2022, on their grid); default: each stage's config (ddim in the "
                        "tiny ones)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM's noise per step for every stage: 0 deterministic, 1 DDPM's variance (default: 0); "
                        "stages sampling with another sampler ignore it")
    p.add_argument("--aug-level", type=float, default=None,
                   help="noise-conditioning augmentation level given to the SR stages (default: their "
                        "configs'; 0.2 in the shipped ones)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda or cuda:N (default: auto, the first GPU if there is one, else the CPU)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the diffusion stages' weights (default: auto, bfloat16 on a GPU that has it, else "
                        "float32); the same seed, device and dtype give identical images")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the stages' networks first (pays off on a GPU for many images; the first "
                        "images take longer while it compiles)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--shard", action="store_true",
                   help="partition the stages' weights across the ranks of a `deepspeed --num_gpus N --module "
                        "cascade.cli ...` launch (ZeRO-3 inference); for models too large for one device")
    p.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                   help="for a model larger than the device's memory: 'model' keeps the stages in CPU memory "
                        "and moves each to the device only while it samples; 'sequential' brings each layer "
                        "over only for its own call (smallest, slowest); with --shard, either keeps the "
                        "partitions in CPU memory (default: none)")
    if num_images:
        p.add_argument("--num-images", type=int, default=4, help="images to make (default: %(default)s)")


def register_model_commands(sub) -> None:
    p = sub.add_parser("generate", help="text -> images through every stage of a model bundle",
                       description="Generate images for a prompt: CLIP text tower -> prior -> decoder -> "
                                   "sr256 -> sr1024. Writes one PNG per image and a grid; prompt, seed and "
                                   "settings are stored in the PNG text chunks.")
    p.add_argument("--prompt", required=True, action=_Once, help="the text to draw")
    p.add_argument("--negative-prompt", metavar="TEXT", action=_Once,
                   help="what not to draw: the prior's and the decoder's guidance steer away from this text "
                        "instead of from no text, e.g. --negative-prompt red")
    p.add_argument("--regions", type=float, metavar="W",
                   help="per-object guidance for an Imagen-style bundle: each object of a prompt that names its "
                        "cell (\"a red star at the top left and a blue circle in the center\") gets its own "
                        "guidance term at scale W, inside its cell only (2 is a good start; docs/results.md). "
                        "A pair placed by a relation (\"a red star above a blue circle\") gets two cells where "
                        "it holds, and the decoder reads the prompt rewritten to name them (stored in the PNG "
                        "as layout_prompt)")
    p.add_argument("--regions-share", type=float, metavar="F",
                   help="run --regions' terms at the noisiest share F of the timesteps only, where the layout "
                        "is decided (t >= (1 - F) T), plain guidance after; 1: every step (default: the "
                        "decoder config's region_share, 0.25: at every step they cost a model that binds by "
                        "itself, docs/results.md)")
    _add_common(p, num_images=True)
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's parameters and the estimated GPU memory (fp32 and bf16, with and "
                        "without --offload model) and exit, reading no weights")
    p.add_argument("--config", nargs="+", action="extend", metavar="YAML",
                   help="with --dry-run: estimate for these stage configs (e.g. configs/dalle2/*.yaml) instead "
                        "of --model's bundle")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON line instead of the tables")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("vary", help="variations of an image (its CLIP embedding, decoded with fresh noise)",
                       description="Make variations of an image (DALL-E 2 section 3.1): its CLIP image "
                                   "embedding -> decoder -> sr256 -> sr1024, each image from fresh noise, so "
                                   "they keep what CLIP sees in the image and vary the rest. No prompt and no "
                                   "prior. Writes one PNG per image and a grid.")
    p.add_argument("--image", required=True, help="the source image file")
    p.add_argument("--negative-prompt", metavar="TEXT", action=_Once,
                   help="what the variations should not show: the decoder's guidance steers away from this "
                        "text's prior embedding (loads the prior)")
    _add_common(p, num_images=True)
    p.set_defaults(func=cmd_vary)

    p = sub.add_parser("img2img", help="redraw an image with a prompt (SDEdit: noise it part way, denoise)",
                       description="Image to image: the image, resized to the decoder's 64x64, is noised to "
                                   "the --strength fraction of the decoder's schedule and denoised with the "
                                   "prompt (its prior embedding and text), then upsampled by sr256 and sr1024. "
                                   "Strength 0 keeps the image, 1 ignores it (the images `generate` makes "
                                   "with the same seed); in between, low strengths keep the layout and "
                                   "colours, high ones follow the prompt. Example: cascade img2img --image "
                                   "scene.png --prompt \"a green star in the center\" --strength 0.6")
    p.add_argument("--image", required=True, help="the source image file")
    p.add_argument("--prompt", required=True, action=_Once, help="the text to draw")
    p.add_argument("--strength", type=float, default=0.6,
                   help="how much of the schedule to noise the image into, 0 to 1 (default: %(default)s)")
    p.add_argument("--negative-prompt", metavar="TEXT", action=_Once, help="what not to draw (as in generate)")
    _add_common(p, num_images=True)
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("inpaint", help="repaint a region of an image with a prompt",
                       description="Inpainting: repaint the region of --image that --mask (a PNG of the same "
                                   "size, white = repaint) or --box marks, with the prompt; everything outside "
                                   "it is kept, at every resolution: the upsamplers paste the original back "
                                   "outside the mask, blended over a few pixels inside its border. Two "
                                   "methods: 'replace' works with any decoder (the known region is replaced "
                                   "by the noised original at every step; --resample adds RePaint's "
                                   "resampling for a better fit at about that many times the decoder's "
                                   "steps); 'glide' needs a decoder fine-tuned with model.inpaint: true "
                                   "(train_stage.py --init-from BUNDLE/decoder), which reads the masked image "
                                   "itself. Example: cascade inpaint --image scene.png --box 0,0,86,86 "
                                   "--prompt \"a blue star at the top left\" --until sr256")
    p.add_argument("--image", required=True, help="the image to edit (centre-cropped square like every input)")
    p.add_argument("--mask", help="mask PNG of the image's size: white (or any non-black) = repaint, black = keep")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="or a box to repaint, in pixels of the image")
    p.add_argument("--prompt", required=True, action=_Once,
                   help="what to draw in the region (describe the whole scene or just the new part)")
    p.add_argument("--negative-prompt", metavar="TEXT", action=_Once, help="what not to draw (as in generate)")
    p.add_argument("--method", choices=("replace", "glide"), default=None,
                   help="default: glide when the bundle's decoder was trained for inpainting, else replace")
    p.add_argument("--resample", type=int, default=1,
                   help="with replace: RePaint's resampling, passes over each jump of steps (default: %(default)s, "
                        "none; 5-10 fits the region better at that many times the decoder's cost)")
    p.add_argument("--jump", type=int, default=1,
                   help="with --resample: how many steps each resampling goes back (default: %(default)s)")
    _add_common(p, num_images=True)
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("interpolate", help="frames between two images (slerp of CLIP embeddings)",
                       description="Blend two images (DALL-E 2 section 3.2): slerp from image A's CLIP image "
                                   "embedding to image B's in --frames steps and decode each, every frame "
                                   "from the same noise at every stage, so only the embedding changes from "
                                   "frame to frame. Writes one PNG per frame and a grid.")
    p.add_argument("--image", action="append", default=[], required=True, help="give twice: image A and image B")
    p.add_argument("--frames", type=int, default=5, help="number of frames, endpoints included (default: %(default)s)")
    _add_common(p)
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("textdiff", help="edit an image by a text difference (DALL-E 2 text diffs)",
                       description="Edit an image with words (DALL-E 2 section 3.3): move its CLIP image "
                                   "embedding towards the direction from the --from caption's text embedding "
                                   "to the --to caption's, by angle fractions from 0 to --max-theta, and "
                                   "decode each frame from the same noise. Writes one PNG per frame and a "
                                   "grid.")
    p.add_argument("--image", required=True, help="the source image file")
    p.add_argument("--from", dest="from_text", required=True, action=_Once, help="text describing the image now")
    p.add_argument("--to", dest="to_text", required=True, action=_Once, help="text describing the wanted image")
    p.add_argument("--frames", type=int, default=5, help="number of frames (default: %(default)s)")
    p.add_argument("--max-theta", type=float, default=0.5,
                   help="largest slerp fraction towards the text diff, above 0 and at most 1 (default: "
                        "%(default)s)")
    _add_common(p)
    p.set_defaults(func=cmd_textdiff)


# ---------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cascade",
        description="Train and run a DALL-E 2 / Imagen-style text-to-image cascade on CPU or GPU.",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from cascade.data import commands as data_commands

    data_commands.register(sub)
    register_model_commands(sub)
    from cascade import evaluation

    evaluation.add_parser(sub)
    from cascade import serve

    serve.add_parser(sub)
    _mark_subparsers(parser)
    return parser


def _mark_subparsers(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command's parser records itself in the namespace it parses, the innermost last."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                subparser.set_defaults(_parser=subparser)
                _mark_subparsers(subparser)


# commands that run for seconds: the load when they start is the load they run under (cascade.process_defaults)
SHORT_COMMANDS = frozenset({"generate", "vary", "img2img", "inpaint", "interpolate", "textdiff"})


def _is_short(argv: list[str]) -> bool:
    command = next((a for a in argv if not a.startswith("-")), None)
    return command in SHORT_COMMANDS


def main(argv: list[str] | None = None) -> int:
    from cascade.process_defaults import set_process_defaults

    set_process_defaults(short=_is_short(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # with the command's own usage line, not the top-level one
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return run_cli("cascade", lambda: args.func(args))


def entry() -> None:
    """The `cascade` command: main(), then an exit that suits a process in a process group (--shard)."""
    from cascade.process_defaults import set_process_defaults

    set_process_defaults(short=_is_short(sys.argv[1:]))  # before anything imports torch (main() calls it again)
    from cascade.training.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()

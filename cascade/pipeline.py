"""The orchestrator: load a model bundle and run its stages in order.

    cascade = Cascade.from_bundle("bundles/tiny")
    out = cascade.generate(["a red circle at the top left"], seed=0, until="sr1024")
    out.images["sr1024"]  # (N, 3, 1024, 1024) in [-1, 1]

Text -> CLIP text tower -> prior (z_i) -> decoder (64) -> sr256 -> sr1024 (DALL-E 2, Ramesh et al. 2022,
figure 2; with Imagen's super-resolution tricks). A bundle whose decoder has `conditioning: imagen` runs
text -> decoder (64) -> sr256 -> sr1024 instead (Imagen): the decoder reads the prompts through its own
frozen language model, and there is no prior; the CLIP text tower then only feeds text-conditioned SR stages. Each stage draws all its noise from one generator seeded
by (seed, stage) (`stage_generator`), so stopping earlier with `until` never changes the images of the
stages that ran, and no two draws of a run repeat each other. Every stage samples with its config's
sampler, steps and guidance unless `Settings` overrides them; all four jobs go through the same
`decode` and `upsample`.

`progress(stage, done, total)`, if given, is called with done = 0 when a stage starts and after each of
its `total` sampling steps (the CLI draws one bar per stage from it).
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cascade.errors import UserError
from cascade.registry import EMBEDDING_JOBS, IMAGE_STAGES, SAMPLED_STAGES, SUPERRES_STAGES, image_stages_until
from cascade.stage import reads_clip, text_only

MAX_PROMPT_CHARS = 300
SEED_LIMIT = 2**63  # seeds are 0 <= seed < SEED_LIMIT (what a signed 64-bit integer holds)
OFFLOAD_MODES = ("none", "model", "sequential")

Progress = Callable[[str, int, int], None]  # progress(stage, done, total); see the module docstring


@dataclass
class Settings:
    """How to sample, as overrides of each stage's own defaults (its config's sampler, steps, guidance and
    t_min, and the SR configs' aug_level): per-stage steps, guidance and t_min (the timestep sampling ends
    at), one sampler for every stage, the SR augmentation level. What is not given here is the stage's."""

    steps: dict[str, int] = field(default_factory=dict)
    guidance: dict[str, float] = field(default_factory=dict)
    t_min: dict[str, int] = field(default_factory=dict)
    sampler: str | None = None
    aug_level: float | None = None
    eta: float | None = None  # DDIM's noise for every stage (None: deterministic DDIM, eta 0)

    def for_stage(self, name: str, stage) -> dict[str, Any]:
        """The keyword arguments `stage.sample` gets: sampler, steps, guidance and t_min (and aug_level for an
        upsampler), each the override or else the stage config's value."""
        from cascade.stage import resolve_sampling

        c = stage.config
        sampler, steps, guidance = resolve_sampling(c, self.sampler, self.steps.get(name), self.guidance.get(name))
        t_min = self.t_min.get(name, getattr(c, "t_min", 0))
        if not 0 <= t_min < stage.schedule.timesteps:
            raise UserError(f"t_min {name}={t_min}: must be at least 0 and below the stage's "
                            f"{stage.schedule.timesteps} timesteps")
        kwargs = {"sampler": sampler, "steps": steps, "guidance": guidance, "t_min": t_min}
        if self.eta is not None:
            kwargs["eta"] = self.eta
        if name in SUPERRES_STAGES:
            kwargs["aug_level"] = c.aug_level if self.aug_level is None else self.aug_level
        return kwargs

    def as_text(self, stages: dict[str, torch.nn.Module]) -> dict[str, str]:
        """The settings every stage of `stages` samples with, for the PNG text chunks."""
        used = {name: self.for_stage(name, stages[name]) for name in SAMPLED_STAGES if name in stages}

        def per_stage(key: str) -> dict[str, Any]:
            return {name: kw[key] for name, kw in used.items() if key in kw}

        def one_or_each(values: dict[str, Any]) -> str:  # "ddim" when every stage agrees, else JSON per stage
            return str(next(iter(values.values()))) if len(set(values.values())) == 1 else json.dumps(values)

        text = {"steps": json.dumps(per_stage("steps")), "guidance": json.dumps(per_stage("guidance")),
                "sampler": one_or_each(per_stage("sampler"))}
        if any(per_stage("t_min").values()):  # where sampling ends, when some stage stops before step 0
            text["t_min"] = json.dumps(per_stage("t_min"))
        if per_stage("eta"):
            text["eta"] = one_or_each(per_stage("eta"))
        if per_stage("aug_level"):
            text["aug_level"] = one_or_each(per_stage("aug_level"))
        return text


@dataclass
class Region:
    """What an inpainting run keeps and repaints: `image` (3, S, S) in [-1, 1] and `mask` (1, S, S) in [0, 1]
    (1 = repaint), at any square size S; each stage gets both resized to its own output size (the mask made
    binary, see `cascade.masks.resize_mask`). `method` and RePaint's `resample` / `jump` are the decoder's
    (see `Decoder.sample`); the SR stages replace the known region at every step and paste the original
    outside the mask, blended over `FEATHER_PER_64` pixels per 64 of output size inside its border."""

    image: torch.Tensor
    mask: torch.Tensor
    method: str | None = None
    resample: int = 1
    jump: int = 1

    FEATHER_PER_64 = 1

    def at(self, size: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(known (rows, 3, size, size), binary mask (1, 1, size, size)) at a stage's output size."""
        from cascade.masks import resize_image, resize_mask

        known = resize_image(self.image[None], size).expand(rows, -1, -1, -1)
        return known, resize_mask(self.mask[None], size)


@dataclass
class Result:
    images: dict[str, torch.Tensor]  # stage name -> (N, 3, S, S) in [-1, 1]
    image_embeddings: torch.Tensor | None  # (N, D); None for an Imagen-style decoder, which has none

    @property
    def final(self) -> torch.Tensor:
        return self.images[[s for s in IMAGE_STAGES if s in self.images][-1]]


def check_seed(seed: int, name: str = "seed") -> int:
    """`seed` if 0 <= seed < 2**63, else a one-line UserError that calls it `name`."""
    try:
        value = operator.index(seed)
    except TypeError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise UserError(f"{name} {seed} is out of range: a seed is a whole number from 0 to 2**63 - 1 "
                        f"({SEED_LIMIT - 1})")
    return value


def stage_generator(seed: int, stage: str) -> torch.Generator:
    """The one generator a stage draws all its noise from in a run with `seed` (x_T, augmentation and
    sampler noise, in that order), so stopping earlier with `until` never changes the images of the
    stages that ran. The generator's seed is taken modulo 2**64 (what torch takes); 7919 is odd, so
    distinct seeds still give distinct generators, and seeds below 2**64 / 7919 keep their old ones."""
    return torch.Generator().manual_seed((check_seed(seed) * 7919 + 1 + SAMPLED_STAGES.index(stage)) % 2**64)


def _step_callback(progress: Progress | None, stage: str, total: int) -> Callable[[dict], None] | None:
    """A per-step callback for `cascade.diffusion.sample` that reports (stage, done, total) to `progress`;
    reports (stage, 0, total) now, as the stage starts."""
    if progress is None:
        return None
    progress(stage, 0, total)
    done = 0

    def step(_: dict) -> None:
        nonlocal done
        done += 1
        progress(stage, done, total)

    return step


def check_prompt(prompt: str) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise UserError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"the prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    return prompt


class Cascade:
    """The stages of one model bundle: `clip` (an encoder) and any of prior, decoder, sr256, sr1024.
    `clip` is None for a bundle whose stages do not read it (`cascade.stage.reads_clip`): an Imagen-style
    decoder and upsamplers without text."""

    def __init__(self, clip, stages: dict[str, torch.nn.Module], manifest: dict | None = None, *,
                 offload: str = "none", execution_device: torch.device | None = None):
        self.clip = clip
        self.stages = stages
        self.manifest = manifest or {}
        self.offload = offload
        self.execution_device = torch.device(execution_device or (clip.image_mean.device if clip is not None
                                                                  else "cpu"))
        check_chain(clip, stages)

    @property
    def device(self) -> torch.device:
        """Where the pipeline's own tensors go: the CLIP's device (the execution device without a CLIP)."""
        return self.execution_device if self.clip is None else self.clip.image_mean.device

    def _sample(self, name: str, conditioning: dict, *, settings: Settings, generator: torch.Generator,
                progress: Progress | None, **options) -> torch.Tensor:
        """`name`'s `sample` with the settings' sampler, steps and guidance for it, reporting its steps to
        `progress`. With model offload the stage is on the execution device only for the call and back in
        CPU memory afterwards (one stage on the device at a time)."""
        from cascade.diffusion.sampling import image_steps

        from cascade.diffusion.inpainting import inpaint_steps

        stage = self._need(name)
        kwargs = settings.for_stage(name, stage)
        total = kwargs["steps"]
        if getattr(stage.config, "objective", "diffusion") != "diffusion":  # a one-pass regressor (SR l1 / l2)
            total = 1
        if options.get("init") is not None:  # image to image takes only part of the steps
            total = image_steps(stage.schedule.timesteps, total, options.get("strength", 1.0), kwargs["t_min"])
        if options.get("mask") is not None:  # RePaint's resampling walks some steps again
            total = inpaint_steps(total, options.get("jump", 1), options.get("resample", 1))
        callback = _step_callback(progress, name, total)
        if self.offload != "model":
            return stage.sample(conditioning, generator=generator, callback=callback, **kwargs, **options)
        stage.to(self.execution_device)
        try:
            return stage.sample(conditioning, generator=generator, callback=callback, **kwargs, **options)
        finally:
            stage.to("cpu")
            if self.execution_device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_bundle(cls, path: str | Path, stages: tuple[str, ...] | None = None, *,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
                    offload: str = "none") -> "Cascade":
        """Load the stages present in bundle `path` (safetensors only; never unpickles) onto `device`, the
        diffusion stages' weights in `dtype` (see `cascade.devices`; the CLIP towers stay fp32).

        `offload` keeps a model larger than the device's memory off it: "model" holds the stages in CPU
        memory and moves each to the device only while it samples; "sequential" (accelerate's
        `cpu_offload`) brings each layer's weights over only for its own forward call, the smallest
        footprint and the slowest. "none" puts everything on the device.

        Checks the manifest's format version and stage list against the folders, and the chain of
        resolutions and embedding sizes between stages; every mismatch is a one-line UserError.
        """
        from cascade.bundle import load_stage, read_manifest, saved_config
        from cascade.devices import resolve_device, resolve_dtype
        from cascade.encoders import load_encoder

        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if offload not in OFFLOAD_MODES:
            raise UserError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, not '{offload}'")

        path = Path(path)
        manifest_path = path / "cascade.json"
        manifest = read_manifest(path)
        listed = list(manifest.get("stages", []))
        wanted = [s for s in SAMPLED_STAGES if s in listed and (stages is None or s in stages)]
        # only the stages this load needs: another may be missing (re-training)
        for name in (["clip"] if "clip" in listed else []) + wanted:
            if not (path / name).is_dir():
                raise UserError(f"{manifest_path} lists stage '{name}' but {path / name} does not exist")
        if "clip" not in listed:
            readers = _clip_readers({name: saved_config(path / name) for name in wanted})
            if readers:  # before any weights load
                raise UserError(f"{manifest_path}: the bundle has no clip stage, which its {readers}; train one "
                                "(--stage clip --export)")
        clip = load_encoder(path / "clip", device=device) if "clip" in listed else None
        home = device if offload == "none" else torch.device("cpu")
        loaded = {name: load_stage(path / name, device=home).to(dtype) for name in wanted}
        if offload == "sequential":
            from accelerate import cpu_offload

            for stage in loaded.values():
                cpu_offload(stage, execution_device=device)
                stage.execution_device = device
        return cls(clip, loaded, manifest, offload=offload, execution_device=device)

    # ------------------------------------------------------------------ stages
    def _need(self, name: str):
        if name not in self.stages:
            have = ", ".join(self.stages) or "none"
            raise UserError(f"this bundle has no {name} stage (it has: {have})")
        return self.stages[name]

    def stages_until(self, until: str) -> list[str]:
        chain = list(image_stages_until(until))
        for name in chain:
            self._need(name)
        return chain

    @property
    def text_only(self) -> bool:
        """Whether the decoder is Imagen-style (`conditioning: imagen`): it reads the prompt's text alone,
        through its own frozen language model, so there is no prior and no image embedding."""
        decoder = self.stages.get("decoder")
        return decoder is not None and text_only(decoder.config)

    def _need_image_embedding(self, job: str) -> None:
        """Refuse one of `EMBEDDING_JOBS` (the CLI and the studio list the same ones) for an Imagen-style bundle."""
        assert job in EMBEDDING_JOBS, job
        if self.text_only:
            raise UserError(f"{job} works on CLIP image embeddings, which this bundle's Imagen-style decoder "
                            "(conditioning: imagen) does not read; use an unCLIP bundle")

    def _need_clip(self, job: str):
        if self.clip is None:
            raise UserError(f"{job} needs the bundle's CLIP, and this bundle has no clip stage")
        return self.clip

    def encode_text(self, texts: list[str]):
        with torch.no_grad():
            return self._need_clip("encoding text for CLIP").encode_text(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._need_clip("encoding an image").encode_image(images.to(self.device))

    def upsample(self, images: torch.Tensor, *, until: str, settings: Settings, seed: int,
                 text: dict | None = None, shared_noise: bool = False,
                 progress: Progress | None = None, region: Region | None = None) -> dict[str, torch.Tensor]:
        """Run sr256 and sr1024 (as far as `until`) on 64x64 decoder images; a text-conditioned upsampler
        gets `text` ({"clip_tokens", "clip_mask"}), when given. With `shared_noise` every row starts from
        the same x_T and augmentation noise (the frames of an animation, where only the embedding may
        change between frames). With `region`, each upsampler inpaints: the original stays outside the
        mask (see `Region`)."""
        from cascade.masks import paste

        out = {"decoder": images}
        low = images
        for name in self.stages_until(until)[1:]:
            stage = self.stages[name]
            g = stage_generator(seed, name)
            cond = {"low_res": low}
            if text is not None and stage.config.text:
                cond.update({k: text[k] for k in ("clip_tokens", "clip_mask")})
            fixed = {}
            if shared_noise:
                b, _, h, w = low.shape
                size = (1, 3, h * stage.scale, w * stage.scale)
                fixed = {"noise": torch.randn(size, generator=g).expand(b, -1, -1, -1),
                         "aug_noise": torch.randn(size, generator=g).expand(b, -1, -1, -1)}
            if region is not None:
                known, mask = region.at(low.shape[-1] * stage.scale, low.shape[0])
                fixed.update(known=known, mask=mask)
            low = self._sample(name, cond, settings=settings, generator=g, progress=progress, **fixed)
            if region is not None:  # the original outside the mask, blended inside its border
                low = paste(low, fixed["known"].to(low.device), fixed["mask"].to(low.device),
                            Region.FEATHER_PER_64 * low.shape[-1] // 64)
            out[name] = low
        return out

    def decode(self, image_emb: torch.Tensor | None, *, settings: Settings, seed: int, text: dict | None = None,
               shared_noise: bool = False, progress: Progress | None = None, negative: dict | None = None,
               init: torch.Tensor | None = None, strength: float = 1.0,
               region: Region | None = None, regions: list | None = None,
               region_guidance: float = 2.0, region_share: float | None = None) -> torch.Tensor:
        """64x64 images for image embeddings (N, D) (and text, when given); an Imagen-style decoder takes
        `image_emb` None and the prompts in `text["txt"]`. With `shared_noise` every row starts from the
        same x_T, so a deterministic sampler makes each image a function of its embedding alone. `negative`: the decoder conditioning guidance steers away from (its keys as the
        conditioning's); `init` (N, 3, 64, 64): image to image at `strength`; `regions`: per-object
        guidance (`Decoder.sample`)."""
        decoder = self._need("decoder")
        g = stage_generator(seed, "decoder")
        cond = {} if image_emb is None else {"clip_image": image_emb}
        if text is not None:
            cond.update(text)
        n = decoder.rows(cond)
        noise = None
        if shared_noise:
            size = decoder.config.image_size
            noise = torch.randn(1, 3, size, size, generator=g).expand(n, -1, -1, -1)
        options = {} if init is None else {"init": init.to(self.device), "strength": strength}
        if region is not None:
            known, mask = region.at(decoder.config.image_size, n)
            options = {"known": known, "mask": mask, "inpaint_method": region.method,
                       "resample": region.resample, "jump": region.jump}
        if regions is not None:
            options.update(regions=regions, region_guidance=region_guidance, region_share=region_share)
        return self._sample("decoder", cond, settings=settings, generator=g, progress=progress, noise=noise,
                            negative=negative, **options)

    def _text(self, prompts: list[str], negative_prompt: str | None, settings: Settings, seed: int,
              progress: Progress | None) -> tuple[torch.Tensor | None, dict, dict | None]:
        """(z_i from the prior, the decoder's text conditioning, the decoder's negative conditioning or
        None) for `prompts`. With `negative_prompt` the prior's guidance steers away from it, and the
        decoder's from its tokens and its own prior embedding, drawn after the prompts' (Kandinsky-style).
        An Imagen-style decoder gets the prompts themselves (`txt`) and no z_i (None): no prior runs; its
        guidance steers away from the negative prompt's text. The CLIP tokens stay in the text either way,
        for text-conditioned upsamplers."""
        n = len(prompts)
        texts = prompts + ([check_prompt(negative_prompt)] if negative_prompt is not None else [])
        if self.text_only:
            if self.clip is None:  # nothing after the decoder reads CLIP tokens (check_chain)
                return None, {"txt": list(prompts)}, None if negative_prompt is None else {"txt": texts[n:] * n}
            _, tokens, mask = self.encode_text(texts)
            text = {"txt": list(prompts), "clip_tokens": tokens[:n], "clip_mask": mask[:n]}
            if negative_prompt is None:
                return None, text, None
            return None, text, {"txt": texts[n:] * n, "clip_tokens": tokens[n:].expand(n, -1, -1),
                                "clip_mask": mask[n:].expand(n, -1)}
        self._need("prior")
        z_t, tokens, mask = self.encode_text(texts)  # one batch: the negative's tokens pad like the prompts'
        text = {"clip_tokens": tokens[:n], "clip_mask": mask[:n]}
        g = stage_generator(seed, "prior")
        neg = None
        if negative_prompt is not None:
            neg = {"clip_text": z_t[n:].expand(n, -1), "clip_tokens": tokens[n:].expand(n, -1, -1),
                   "clip_mask": mask[n:].expand(n, -1)}
        z_i = self._sample("prior", {"clip_text": z_t[:n], **text}, settings=settings, generator=g,
                           progress=progress, negative=neg)
        if neg is None:
            return z_i, text, None
        z_neg = self._sample("prior", neg, settings=settings, generator=g, progress=progress)
        return z_i, text, {"clip_image": z_neg, "clip_tokens": neg["clip_tokens"], "clip_mask": neg["clip_mask"]}

    # ------------------------------------------------------------------ the four jobs
    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int = 0, until: str = "sr1024",
                 settings: Settings | None = None, progress: Progress | None = None,
                 negative_prompt: str | None = None, regions: float | None = None,
                 region_share: float | None = None) -> Result:
        """Text -> images: CLIP text tower, prior, decoder, then super-resolution up to `until` (an
        Imagen-style decoder: the prompts straight into the decoder, no prior); with `negative_prompt`, the
        prior's and the decoder's guidance steer away from it. `regions` W (an Imagen-style decoder): each
        object whose cell the prompt names also gets its own guidance term, at scale W, inside its cell
        (`cascade.layout`), and a prompt that places a pair by a relation ("above") gets a planned layout, the
        decoder reading the prompt rewritten to name the planned cells (`layout_prompt`); other prompts are
        sampled as without it. The terms run at the noisiest `region_share` of the timesteps (default: the
        decoder config's `region_share`, 0.25; `Decoder.sample`)."""
        settings = settings or Settings()
        prompts = [check_prompt(p) for p in prompts]
        self.stages_until(until)
        layout, texts = None, prompts
        if regions is not None:
            if not self.text_only:
                raise UserError("--regions needs an Imagen-style bundle (its decoder reads the text itself)")
            from cascade.layout import layout_prompt, prompt_regions

            size = self._need("decoder").config.image_size
            layout = [prompt_regions(p, size) for p in prompts]
            texts = [layout_prompt(p) for p in prompts]  # a relation's prompt names its planned cells
        z_i, text, negative = self._text(texts, negative_prompt, settings, seed, progress)
        per_object = {} if layout is None else {"regions": layout, "region_guidance": regions,
                                                "region_share": region_share}
        x = self.decode(z_i, settings=settings, seed=seed, text=text, progress=progress, negative=negative,
                        **per_object)
        return Result(self.upsample(x, until=until, settings=settings, seed=seed, text=text, progress=progress),
                      z_i)

    @torch.no_grad()
    def vary(self, image: torch.Tensor, *, num_images: int = 4, seed: int = 0, until: str = "sr1024",
             settings: Settings | None = None, progress: Progress | None = None,
             negative_prompt: str | None = None) -> Result:
        """Image variations (DALL-E 2 section 3.1): the CLIP image embedding decoded with fresh noise;
        with `negative_prompt`, the decoder's guidance steers away from that text's prior embedding."""
        settings = settings or Settings()
        self._need_image_embedding("vary")  # before the stages: the first thing wrong for such a bundle
        self.stages_until(until)
        z_i = self.encode_image(image[None]).expand(num_images, -1)
        negative = None
        if negative_prompt is not None:  # the negative text's prior embedding, drawn as generate draws one
            z_neg, _, _ = self._text([check_prompt(negative_prompt)], None, settings, seed, progress)
            negative = {"clip_image": z_neg.expand(num_images, -1)}
        x = self.decode(z_i, settings=settings, seed=seed, progress=progress, negative=negative)
        return Result(self.upsample(x, until=until, settings=settings, seed=seed, progress=progress), z_i)

    @torch.no_grad()
    def img2img(self, image: torch.Tensor, prompt: str, *, strength: float, num_images: int = 1, seed: int = 0,
                until: str = "sr1024", settings: Settings | None = None, progress: Progress | None = None,
                negative_prompt: str | None = None) -> Result:
        """Image to image (SDEdit): `image` (3, S, S), S the decoder's size, noised to the `strength`
        fraction of the decoder's schedule and denoised with the prompt's prior embedding and text; the
        upsamplers then run as in `generate`. Strength 0 returns the image at 64x64 (upsampled), strength 1
        the images `generate` makes with the same seed."""
        settings = settings or Settings()
        prompt = check_prompt(prompt)
        if not 0.0 <= strength <= 1.0:
            raise UserError(f"--strength {strength}: must be between 0 and 1")
        self.stages_until(until)
        size = self._need("decoder").config.image_size
        if tuple(image.shape) != (3, size, size):
            shape = "x".join(map(str, image.shape))
            raise UserError(f"the image must be 3x{size}x{size} for this decoder, got {shape}")
        z_i, text, negative = self._text([prompt] * num_images, negative_prompt, settings, seed, progress)
        init = image[None].expand(num_images, -1, -1, -1)
        x = self.decode(z_i, settings=settings, seed=seed, text=text, progress=progress, negative=negative,
                        init=init, strength=strength)
        return Result(self.upsample(x, until=until, settings=settings, seed=seed, text=text, progress=progress), z_i)

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, prompt: str, *, method: str | None = None,
                num_images: int = 1, seed: int = 0, until: str = "sr1024", settings: Settings | None = None,
                progress: Progress | None = None, negative_prompt: str | None = None, resample: int = 1,
                jump: int = 1) -> Result:
        """Repaint the region of `image` (3, S, S) in [-1, 1] where `mask` (1, S, S) in [0, 1] is 1 with
        the prompt, through the decoder (`method` "replace" for any decoder, "glide" for one trained with
        `inpaint: true`; default: glide where the decoder has it; RePaint's `resample`, `jump` for replace)
        and the upsamplers, which keep the original outside the mask (`Region`). Every output keeps the
        image, resized to its stage's size, exactly where the mask is 0."""
        from cascade.diffusion.inpainting import check_inpaint_options
        from cascade.masks import check_mask

        settings = settings or Settings()
        prompt = check_prompt(prompt)
        self.stages_until(until)
        if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
            raise UserError(f"the image to inpaint must be square, 3xSxS, got {'x'.join(map(str, image.shape))}")
        if tuple(mask.shape) != (1, *image.shape[1:]):
            raise UserError(f"the mask is {'x'.join(map(str, mask.shape[1:]))} but the image is "
                            f"{'x'.join(map(str, image.shape[1:]))}; they must be the same size")
        check_mask(mask)
        decoder = self._need("decoder")
        method = decoder.inpaint_method(method)
        if method == "glide" and (resample, jump) != (1, 1):
            raise UserError("RePaint's resampling (resample, jump) goes with the replace method, not glide")
        check_inpaint_options(settings.for_stage("decoder", decoder)["sampler"], resample, jump)
        region = Region(image.float(), mask.float().clamp(0, 1), method, resample, jump)
        z_i, text, negative = self._text([prompt] * num_images, negative_prompt, settings, seed, progress)
        x = self.decode(z_i, settings=settings, seed=seed, text=text, progress=progress, negative=negative,
                        region=region)
        return Result(self.upsample(x, until=until, settings=settings, seed=seed, text=text, progress=progress,
                                    region=region), z_i)

    @torch.no_grad()
    def interpolate(self, image_a: torch.Tensor, image_b: torch.Tensor, *, frames: int = 5, seed: int = 0,
                    until: str = "sr1024", settings: Settings | None = None,
                    progress: Progress | None = None) -> Result:
        """Slerp between two images' CLIP embeddings, every stage's noise shared by the frames (section 3.2)."""
        from decoder.manipulation import slerp

        settings = settings or Settings()
        self._need_image_embedding("interpolate")
        self.stages_until(until)
        z = self.encode_image(torch.stack([image_a, image_b]))
        z_i = slerp(z[:1], z[1:], torch.linspace(0, 1, frames)[:, None])
        x = self.decode(z_i, settings=settings, seed=seed, shared_noise=True, progress=progress)
        return Result(self.upsample(x, until=until, settings=settings, seed=seed, shared_noise=True,
                                    progress=progress), z_i)

    @torch.no_grad()
    def textdiff(self, image: torch.Tensor, text_from: str, text_to: str, *, frames: int = 5,
                 max_theta: float = 0.5, seed: int = 0, until: str = "sr1024",
                 settings: Settings | None = None, progress: Progress | None = None) -> Result:
        """Text diffs (section 3.3): move z_i towards normalize(z_t(to) - z_t(from)) by angle fractions
        theta in [0, max_theta] (0 <= max_theta <= 1), every stage's noise shared by the frames."""
        from decoder.manipulation import text_diff

        if not 0 <= max_theta <= 1:
            raise UserError(f"max_theta {max_theta}: must be between 0 and 1")
        settings = settings or Settings()
        self._need_image_embedding("textdiff")
        self.stages_until(until)
        z_t, _, _ = self.encode_text([check_prompt(text_from), check_prompt(text_to)])
        z_img = self.encode_image(image[None])
        theta = torch.linspace(0, max_theta, frames)[:, None]
        z_i = text_diff(z_img, z_t[:1], z_t[1:], theta)
        x = self.decode(z_i, settings=settings, seed=seed, shared_noise=True, progress=progress)
        return Result(self.upsample(x, until=until, settings=settings, seed=seed, shared_noise=True,
                                    progress=progress), z_i)


def _clip_readers(configs: dict[str, Any]) -> str:
    """The stages of {name: config} that read CLIP (`cascade.stage.reads_clip`) as the start of a
    sentence ("prior and decoder read", "sr256 reads"); "" when none does."""
    readers = [name for name, config in configs.items() if reads_clip(name, config)]
    if not readers:
        return ""
    return f"{' and '.join(readers)} read{'s' if len(readers) == 1 else ''}"


def check_chain(clip, stages: dict) -> None:
    """The resolutions and embedding sizes must line up from one stage to the next, and a stage that
    reads CLIP needs one (`clip` None: the bundle has none); each mismatch is a one-line UserError."""
    if clip is None:
        readers = _clip_readers({name: stage.config for name, stage in stages.items()})
        if readers:
            raise UserError(f"{readers} CLIP embeddings or tokens, and there is no clip stage")
        d = dt = None
    else:
        d, dt = clip.embed_dim, clip.token_dim
    wants = {"prior": [("embed_dim", d), ("token_dim", dt)], "decoder": [("clip_dim", d), ("text_dim", dt)]}
    for name, checks in wants.items():
        # an Imagen-style decoder reads its own frozen language model, not the bundle's CLIP
        if name in stages and not text_only(stages[name].config):
            for key, have in checks:
                want = getattr(stages[name].config, key)
                if want != have:
                    raise UserError(f"{name} was trained with {key}={want}, but the bundle's clip gives {have}")
    for name in SUPERRES_STAGES:
        stage = stages.get(name)
        if stage is not None and stage.config.text and stage.config.text_dim != dt:
            raise UserError(f"{name} was trained with text_dim={stage.config.text_dim}, "
                            f"but the bundle's clip gives {dt}")
    size = stages["decoder"].config.image_size if "decoder" in stages else None
    for name in SUPERRES_STAGES:
        if name in stages:
            stage = stages[name]
            if size is not None and stage.low_size != size:
                raise UserError(f"{name} takes {stage.low_size}x{stage.low_size} inputs, but the stage before "
                                f"it makes {size}x{size}")
            size = stage.high_size

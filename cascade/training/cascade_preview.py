"""Pictures while a stage trains: a few prompts through a whole cascade in which the training stage's
current EMA weights stand in for that stage, and an exported bundle provides the others.

`make demo` trains the decoder last but one, after the CLIP, prior and sr256 of its bundle, and writes
`out/<plan>/progress/step-NNNNNN.png` (the prompts at 256x256, through prior -> decoder -> sr256) every
few minutes of decoder training, so the first pictures come long before the demo ends. The same from
the command line:

    python train_stage.py --stage decoder ... --preview-bundle bundles/tiny --preview-minutes 10 \\
        --preview-prompt "a red circle at the top left" --preview-prompt "a green star in the center"
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cascade.errors import UserError
from cascade.registry import image_stages_until

DEFAULT_PROMPTS = ("a red circle at the top left", "a big blue square below a small yellow triangle",
                   "a green star in the center")


class CascadePreview:
    """Generates `prompts` (seed `seed`, each stage's default sampling) through the bundle's stages up
    to `until`, with the training stage's weights in place of the bundle's; writes one captioned grid per
    call to `out/step-NNNNNN.png` and a line per grid to `out/previews.jsonl` (step, minutes since the
    run started, path)."""

    def __init__(self, bundle: Path, stage: str, out: Path, *, prompts=DEFAULT_PROMPTS, until: str = "sr256",
                 seed: int = 0, prior: bool = True):
        from cascade.bundle import read_manifest
        from cascade.pipeline import check_prompt

        self.bundle, self.stage, self.out, self.until, self.seed = Path(bundle), stage, Path(out), until, seed
        self.prompts = [check_prompt(p) for p in prompts]
        if not self.prompts:
            raise UserError("--preview-bundle needs at least one --preview-prompt")
        chain = list(image_stages_until(until))
        if stage not in chain:
            raise UserError(f"--preview-bundle previews stages up to {until} ({', '.join(chain)}); "
                            f"{stage} is not one of them")
        listed = read_manifest(self.bundle).get("stages", [])
        # prior False: the trained decoder is Imagen-style and reads the prompts itself
        self.others = tuple(s for s in (("prior",) if prior else ()) + tuple(chain) if s != stage)
        # an Imagen-style decoder's chain reads CLIP only through a text-conditioned upsampler (check_chain)
        missing = [s for s in (("clip",) if prior else ()) + self.others if s not in listed]
        if missing:
            raise UserError(f"--preview-bundle {self.bundle}: previews of {stage} through {until} need its "
                            f"{', '.join(missing)} stage{'s' if len(missing) > 1 else ''} (it has: "
                            f"{', '.join(listed) or 'none'}); train and export those first")
        self._cascade = None
        self._started = time.monotonic()

    def check(self, stage_cls, config) -> None:
        """Load the bundle's other stages now and check that a `stage_cls` built from `config` fits
        between them (embedding sizes, resolutions), so a mismatch stops the run before it trains."""
        from types import SimpleNamespace

        from cascade.pipeline import Cascade, check_chain

        if self._cascade is None:
            self._cascade = Cascade.from_bundle(self.bundle, stages=self.others, device="cpu")
        shape = SimpleNamespace(config=config, low_size=getattr(stage_cls, "low_size", None),
                                high_size=getattr(stage_cls, "high_size", None))
        check_chain(self._cascade.clip, {**self._cascade.stages, self.stage: shape})

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> Path:
        """One grid of the prompts with `model` (the EMA stage, in eval mode) in the cascade."""
        from cascade.images import make_grid, save_png
        from cascade.pipeline import Settings

        self.check(type(model), model.config)
        cascade = self._cascade
        device = next(model.parameters()).device
        for other in cascade.stages.values():
            other.to(device)
        if cascade.clip is not None:
            cascade.clip.to(device)
        cascade.stages[self.stage] = model
        try:
            result = cascade.generate(self.prompts, seed=self.seed, until=self.until, settings=Settings())
        finally:
            del cascade.stages[self.stage]
        images = result.final.float().cpu()
        minutes = (time.monotonic() - self._started) / 60
        path = self.out / f"step-{step:06d}.png"
        save_png(make_grid(images, self.prompts, ncols=len(self.prompts)), path,
                 {"step": str(step), "minutes": f"{minutes:.1f}", "prompts": json.dumps(self.prompts)})
        with open(self.out / "previews.jsonl", "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": step, "minutes": round(minutes, 2), "path": str(path)}) + "\n")
        return path

"""A studio: one loaded cascade, its gallery and its job queue; what the web app's routes call."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from cascade.errors import UserError
from cascade.registry import EMBEDDING_JOBS
from cascade.serve import forms
from cascade.serve.gallery import Gallery, animated_png
from cascade.serve.jobs import Job, JobQueue
from cascade.serve.uploads import MAX_PIXELS, MAX_UPLOAD_BYTES, mask_image, open_upload, square_image

UPLOAD_KINDS = ("image", "mask")


class Studio:
    def __init__(self, cascade, model: str, *, eval_text: str | None = None, max_queued: int = 16,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.cascade = cascade
        self.model = model
        self.eval_text = eval_text
        self.max_upload_bytes = max_upload_bytes
        self.gallery = Gallery()
        self.queue = JobQueue(max_queued)
        self.closing = threading.Event()  # set when the server stops: open event streams end

    def start(self) -> "Studio":
        self.queue.start()
        return self

    def stop(self) -> None:
        self.closing.set()
        self.queue.stop()

    def info(self) -> dict[str, Any]:
        """The bundle, device, the stages loaded with their own sampling defaults, the limits, eval.md."""
        from cascade.cli import SAMPLER_CHOICES
        from cascade.pipeline import Settings

        defaults = Settings()
        stages = {name: {**defaults.for_stage(name, stage), "dtype": str(next(stage.parameters()).dtype)}
                  for name, stage in self.cascade.stages.items()}
        for name, stage in self.cascade.stages.items():
            size = getattr(stage.config, "image_size", None) or getattr(stage, "high_size", None)
            if size:
                stages[name]["size"] = size
        decoder = self.cascade.stages.get("decoder")
        return {"model": self.model, "device": str(self.cascade.execution_device), "stages": stages,
                "image_stages": [s for s in forms.IMAGE_STAGES if s in self.cascade.stages],
                "samplers": list(SAMPLER_CHOICES), "inpaint": forms.default_inpaint_method(self.cascade),
                "eval": self.eval_text, "max_upload_bytes": self.max_upload_bytes, "max_pixels": MAX_PIXELS,
                "max_queued": self.queue.max_queued, "text_only": self.cascade.text_only,
                "region_share": None if decoder is None else decoder.config.region_share,  # per-object guidance's
                "embedding_jobs": list(EMBEDDING_JOBS)}

    def upload(self, data: bytes, name: str, kind: str = "image") -> dict[str, Any]:
        """A checked upload into the gallery: an input image (centre-cropped square) or a drawn mask."""
        if kind not in UPLOAD_KINDS:
            raise UserError(f"an upload is an {' or a '.join(UPLOAD_KINDS)}, not {kind!r}")
        name = Path(name or "upload.png").name[:100] or "upload.png"
        image = open_upload(data, name, max_bytes=self.max_upload_bytes)
        if kind == "mask":
            return self.gallery.add("mask", name, mask_image(image)).describe()
        return self.gallery.add("upload", name, square_image(image), {"source": name}).describe()

    def submit(self, body: Any) -> dict[str, Any]:
        """Check a job request and queue it; its description (id, place in the queue)."""
        spec = forms.parse(body, cascade=self.cascade, gallery=self.gallery, model=self.model)
        client = body.get("client") if isinstance(body.get("client"), str) else ""
        job = Job(spec.kind, client[:64], spec.stages, work=None,
                  request={k: v for k, v in spec.text.items() if k != "model"})
        job.work = lambda progress: self._run(spec, job, progress)
        return self.queue.describe(self.queue.submit(job))

    def _run(self, spec: forms.Spec, job: Job, progress) -> dict[str, Any]:
        """Run the pipeline call and put its images (and an animation of frames) into the gallery."""
        result = spec.call(self.cascade, spec.settings, progress)
        used = {name: self.cascade.stages[name] for name in spec.stages}
        text = {**spec.text, **spec.settings.as_text(used)}
        images = result.final
        items = [self.gallery.add("result", f"{spec.stem}-{i:02d}.png", image, {**text, "index": str(i)}, job=job.id)
                 for i, image in enumerate(images)]
        out = {"images": [item.id for item in items], "labels": spec.labels}
        if spec.animated:
            frames = [item.image() for item in items]
            anim = self.gallery.add("animation", f"{spec.stem}-strip.png", frames[0], text, job=job.id,
                                    png=animated_png(frames))
            out["animation"] = anim.id
        return out

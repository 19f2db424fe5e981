"""Super-resolution on held-out natural photographs: scikit-image's bundled photos (in its wheel, read from
disk; nothing is downloaded), which no stage trains on, scored like the val crops (PSNR / SSIM beside
bicubic) at each stage's own task:

* sr256, 64 -> 256 on whole scenes, as the cascade runs it: the photo's centre square at 256 (high) and at
  64 (low), each resized from the original in one Lanczos step, as `cascade data build --source folder:`
  makes a sample's sizes.
* sr1024, 256 -> 1024 on detail at full resolution: a 1024 image's pixels are the photo's own, so the
  high-res image is the photo's most detailed 256 x 256 window at native resolution (`eval_crop`, the
  window with the most edge energy) and the low-res one that window resized to 64. No photo is upscaled.

Grey photos are used as RGB (three equal channels).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cascade.errors import UserError

# the photographs (and two micrographs) among scikit-image's bundled data; not its drawings, charts,
# scans of text or binary masks
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png",
          "brick.png", "grass.png", "gravel.png")


def photo_dir() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise UserError("the photo SR evaluation reads scikit-image's bundled photos: pip install scikit-image "
                        "(it is in cascade's test extra)") from None
    return Path(skimage.data.__file__).parent


def load_photos(names: tuple[str, ...] | None = None):
    """{name: PIL RGB image} of the bundled photos (`names`, default: PHOTOS)."""
    from PIL import Image

    folder = photo_dir()
    photos = {}
    for name in PHOTOS if names is None else names:
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path}: not in this scikit-image install (its bundled data changed?)")
        with Image.open(path) as image:
            photos[name] = image.convert("RGB")
    return photos


def photo_pairs(stage_name: str, photos=None, crop: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(low (N, 3, 64, 64), high (N, 3, 256, 256), names) for `stage_name`'s task (module docstring)."""
    from PIL import Image

    from cascade.data.folder import square_resize
    from cascade.data.reader import image_to_tensor
    from superres.evaluation import detailed_positions

    photos = load_photos() if photos is None else photos
    low, high = [], []
    for name, image in photos.items():
        if stage_name == "sr256":
            high.append(image_to_tensor(square_resize(image, 256)))
            low.append(image_to_tensor(square_resize(image, 64)))
        elif stage_name == "sr1024":
            if min(image.size) < crop:
                raise UserError(f"{name} is {image.size[0]}x{image.size[1]}, smaller than the {crop}-px window")
            full = image_to_tensor(image)[None]
            (y, x), = detailed_positions(full, crop)
            window = image.crop((x, y, x + crop, y + crop))
            high.append(image_to_tensor(window))
            low.append(image_to_tensor(window.resize((crop // 4, crop // 4), Image.LANCZOS)))
        else:
            raise UserError(f"no photo evaluation for stage '{stage_name}' (sr256 and sr1024 have one)")
    return torch.stack(low), torch.stack(high), list(photos)


@torch.no_grad()
def evaluate_photos(stage, seed: int = 0, pairs=None, batch: int = 4) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR / SSIM of `stage` (sampled at its config's defaults, as the pipeline runs it) and of bicubic on
    its photo task (`pairs`: `photo_pairs(stage.name)`'s result, computed when not given); keys
    psnr_photos, ssim_photos, psnr_photos_bicubic, ssim_photos_bicubic, photos. Also returns the upsampled
    images (N, 3, 256, 256)."""
    from superres.metrics import bicubic_upsample, psnr, ssim

    low, high, names = photo_pairs(stage.name) if pairs is None else pairs
    outs = []
    for start in range(0, len(low), batch):
        g = torch.Generator().manual_seed(seed + start)  # CPU-drawn noise, as the pipeline draws it
        outs.append(stage.sample({"low_res": low[start:start + batch]}, generator=g).float().cpu())
    out = torch.cat(outs)
    bicubic = bicubic_upsample(low, high.shape[-1])
    scores = {"psnr_photos": psnr(out, high).mean().item(), "ssim_photos": ssim(out, high).mean().item(),
              "psnr_photos_bicubic": psnr(bicubic, high).mean().item(),
              "ssim_photos_bicubic": ssim(bicubic, high).mean().item(), "photos": float(len(names))}
    return scores, out

"""Image corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019), with its five severity
levels, from its four families: noise (gaussian_noise, shot_noise), blur (gaussian_blur),
weather (brightness) and digital (contrast, jpeg_compression, pixelate).

The constants are those of the ``imagecorruptions`` package (the reference implementation);
the functions are written here over numpy, Pillow and torchvision (which the image modality
already uses) instead of pulling in that package's OpenCV, scikit-image and Wand. Each takes an
RGB uint8 array (height x width x 3) at the size the model's transform resizes it to (its
shorter side ``resize_size``, before the centre crop) and returns one of the same shape. The
blur's sigma is ImageNet-C's for 224-pixel images scaled to the image's shorter side, so that
a severity blurs the same fraction of the picture at any input size. torch, torchvision and
matplotlib are imported where used: the workflow reads the names of the shifts when it parses
the config, and the image modality keeps torchvision out of that (1.2 s).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from adaptune.modalities.shifts import Shift, at_severity

IMAGENET_C_SIDE = 224


def _as_uint8(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] back to 8-bit pixels."""
    return (np.clip(values, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = at_severity((0.08, 0.12, 0.18, 0.26, 0.38), severity)
    return _as_uint8(image / 255.0 + rng.normal(0.0, sigma, image.shape))


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = at_severity((60, 25, 12, 5, 3), severity)
    return _as_uint8(rng.poisson(image / 255.0 * photons) / photons)


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = at_severity((1, 2, 3, 4, 6), severity) * min(image.shape[:2]) / IMAGENET_C_SIDE
    # A kernel of about 4 sigma either side, odd and no wider than the image allows.
    size = max(3, 2 * round(4 * sigma) + 1)
    limit = 2 * (min(image.shape[:2]) // 2) - 1
    size = min(size, max(limit, 3))
    import torch
    import torchvision.transforms.v2.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    blurred = F.gaussian_blur(tensor, [size, size], [sigma, sigma])
    return blurred.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    shift = at_severity((0.1, 0.2, 0.3, 0.4, 0.5), severity)
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(image / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0.0, 1.0)
    return _as_uint8(hsv_to_rgb(hsv))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = at_severity((0.4, 0.3, 0.2, 0.1, 0.05), severity)
    values = image / 255.0
    means = values.mean(axis=(0, 1), keepdims=True)
    return _as_uint8((values - means) * factor + means)


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = at_severity((25, 18, 15, 10, 7), severity)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=int(quality))
    return np.asarray(Image.open(buffer).convert("RGB"))


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    factor = at_severity((0.6, 0.5, 0.4, 0.3, 0.25), severity)
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize(
        (max(1, int(width * factor)), max(1, int(height * factor))), Image.Resampling.BOX
    )
    return np.asarray(small.resize((width, height), Image.Resampling.BOX))


SHIFTS = {
    shift.name: shift
    for shift in (
        Shift("gaussian_noise", "noise", "additive Gaussian pixel noise", gaussian_noise),
        Shift("shot_noise", "noise", "Poisson (photon) noise", shot_noise),
        Shift("gaussian_blur", "blur", "Gaussian blur", gaussian_blur),
        Shift("brightness", "weather", "brightened (HSV value raised)", brightness),
        Shift("contrast", "digital", "contrast reduced towards the mean", contrast),
        Shift("jpeg_compression", "digital", "JPEG compression artefacts", jpeg_compression),
        Shift("pixelate", "digital", "down- and up-sampled in blocks", pixelate),
    )
}

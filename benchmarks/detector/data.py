"""Real patches from photos that ship inside pip packages, and forgery families applied to them.

Sources (all offline): scikit-image's bundled RGB photos and `lfw_subset` faces, scikit-learn's
`load_sample_images`, matplotlib's sample `grace_hopper.jpg`. The split is by whole source image
(and by face identity index for the splice family): no test patch shares pixels with a training one.

Every sample, real or fake, goes through the same pipeline: crop a work patch (with a margin so
filters see no border) from a randomly rescaled source, apply the family's forgery (none for real),
centre-crop to `size`, quantize to 8 bits and JPEG-compress at a random quality in [80, 95]
("laundering", as on social media). So the only systematic difference between a real and a fake is
the forgery itself — never the pipeline. Forgery strengths are set so that no family is trivially
separable (see FAMILY_STRENGTH); a generator "fingerprint" (kernel, frequencies, colour matrix) is
drawn once per family from a fixed seed, as a real generator's would be fixed.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

TRAIN_FAMILIES = ("gan_upsample", "face_splice", "double_jpeg", "diffusion_texture", "spectral_colour")
# Held-out families are unseen "generators" of the same kinds as the training ones (the paper's
# cross-generator setting): another GAN decoder, another diffusion decoder, a splice without faces,
# a recompression + resize chain. Wholly unrelated traces would leave every model at chance.
HELDOUT_FAMILIES = ("unseen_gan", "unseen_diffusion", "copy_move", "jpeg_resize")
ALL_FAMILIES = TRAIN_FAMILIES + HELDOUT_FAMILIES

# Source photos, grouped so that near-duplicates (the motorcycle stereo pair) stay on one side.
TRAIN_SOURCES = ("astronaut", "rocket", "motorcycle", "retina", "ihc", "hubble_deep_field", "flower")
TEST_SOURCES = ("chelsea", "coffee", "china", "grace_hopper")
_SKIMAGE_FILES = {
    "astronaut": ("astronaut.png",), "rocket": ("rocket.jpg",), "retina": ("retina.jpg",), "ihc": ("ihc.png",),
    "hubble_deep_field": ("hubble_deep_field.jpg",), "chelsea": ("chelsea.png",), "coffee": ("coffee.png",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
}
# lfw_subset holds 100 faces then 100 non-faces; faces 0–69 train, 70–99 test.
FACE_SPLIT = {"train": range(0, 70), "test": range(70, 100)}

SHORT_SIDE = 384          # every source is first resized so its short side is this (retina is 1411 px)
MIN_PATCH_STD = 0.04      # reject nearly flat crops (hubble's black sky) in every class alike
JPEG_QUALITY = (80, 95)   # final compression of every sample

# Strength of each forgery (amplitudes, blend weights, qualities). Tuned on the smoke run so that a
# specialist separates its family well but not perfectly, and families differ in difficulty.
FAMILY_STRENGTH = {
    "gan_upsample": 0.25,       # weight of the upsampled image and of the checkerboard kernel error
    "face_splice": 0.55,        # peak alpha of the spliced face
    "double_jpeg": (55, 75),    # range of the first JPEG quality
    "diffusion_texture": 0.5,   # blend weight of the smoothed image; texture amplitude scales with it
    "spectral_colour": 0.008,   # amplitude of the periodic spectral peaks (colour matrix scales with it)
    "unseen_gan": 0.5,          # as gan_upsample, with another upsampler and kernel
    "unseen_diffusion": 0.5,    # as diffusion_texture, with ×4 decoder smoothing and another band
    "copy_move": 0.8,           # peak alpha of the moved block
    "jpeg_resize": (55, 75),    # first JPEG quality, then a ×1.05–1.2 resize
}


def _import_pil():
    from PIL import Image
    return Image


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    Image = _import_pil()
    pil = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    return a.astype(np.float32) / 255.0


def load_sources() -> dict[str, list[np.ndarray]]:
    """name → list of float32 HxWx3 images in [0, 1], short side SHORT_SIDE."""
    import skimage.data
    from sklearn.datasets import load_sample_images
    import matplotlib.cbook as cbook
    Image = _import_pil()

    data_dir = os.path.dirname(skimage.data.__file__)
    raw: dict[str, list[np.ndarray]] = {}
    for name, files in _SKIMAGE_FILES.items():
        # Read the bundled files directly: skimage.data's fetchers may try to download.
        raw[name] = [_rgb(Image.open(os.path.join(data_dir, f)).convert("RGB")) for f in files]
    china, flower = load_sample_images().images
    raw["china"], raw["flower"] = [_rgb(china)], [_rgb(flower)]
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        raw["grace_hopper"] = [_rgb(Image.open(f).convert("RGB"))]
    out = {}
    for name, imgs in raw.items():
        out[name] = []
        for img in imgs:
            h, w = img.shape[:2]
            s = SHORT_SIDE / min(h, w)
            out[name].append(_resize(img, round(h * s), round(w * s)))
    return out


def load_faces() -> np.ndarray:
    """lfw_subset faces, (100, 25, 25) float in [0, 1]."""
    import skimage.data
    return np.load(os.path.join(os.path.dirname(skimage.data.__file__), "lfw_subset.npy"))[:100].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Filters (numpy/scipy only; every function takes and returns float32 HxWx3 in [0, 1]-ish)

def _gauss(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    Image = _import_pil()
    buf = io.BytesIO()
    Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf), dtype=np.float32) / 255.0


@dataclass
class Fingerprints:
    """Per-family fixed 'generator' parameters, drawn once from a fixed seed."""

    tconv_error: np.ndarray      # 4x4 perturbation of the bilinear transposed-conv kernel
    unseen_error: np.ndarray     # 3x3 perturbation of the unseen GAN's smoothing conv
    texture_band: tuple          # (sigma_lo, sigma_hi) of the diffusion texture's band-pass
    spectral_freqs: np.ndarray   # (3, 2) cycles/pixel of the periodic peaks
    colour_matrix: np.ndarray    # 3x3 deviation from identity


def make_fingerprints(seed: int = 1234) -> Fingerprints:
    rng = np.random.default_rng(seed)
    err = rng.standard_normal((4, 4)).astype(np.float32)
    err -= err.mean()
    freqs = np.array([[0.25, 0.0], [0.0, 0.25], [0.125, 0.375]], dtype=np.float32)
    colour = rng.standard_normal((3, 3)).astype(np.float32)
    colour -= colour.mean(axis=1, keepdims=True)  # keeps grey grey to first order: a hue shift, not a cast
    err3 = rng.standard_normal((3, 3)).astype(np.float32)
    err3 -= err3.mean()
    return Fingerprints(err / np.abs(err).max(), err3 / np.abs(err3).max(), (0.7, 1.6), freqs, colour)


def _transposed_conv_up2(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """×2 upsampling by zero insertion + 4×4 kernel: the transposed convolution of GAN decoders."""
    from scipy.ndimage import convolve
    h, w, _ = img.shape
    up = np.zeros((2 * h, 2 * w, 3), dtype=np.float32)
    up[::2, ::2] = img
    return np.stack([convolve(up[..., c], kernel, mode="reflect") for c in range(3)], axis=-1)


_BILINEAR_4 = np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]).astype(np.float32)


def gan_upsample(x, rng, fp: Fingerprints, s):
    h, w, _ = x.shape
    low = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    # A learned kernel = the bilinear one plus a fixed error: the error's period-2 response to the
    # zero-inserted input is the checkerboard artefact of transposed convolutions.
    up = _transposed_conv_up2(low, _BILINEAR_4 + 0.25 * s * fp.tconv_error)
    return (1 - s) * x + s * up


def face_splice(x, rng, fp, s, faces: np.ndarray):
    h, w, _ = x.shape
    face = faces[rng.integers(len(faces))]
    size = int(rng.integers(int(0.45 * h), int(0.7 * h)))
    face = _resize(np.repeat(face[..., None], 3, axis=2), size, size)
    top, left = (int(rng.integers(h // 6, h - size - h // 6 + 1)) for _ in range(2)) if size < h * 2 // 3 else (
        (h - size) // 2, (w - size) // 2)
    region = x[top:top + size, left:left + size]
    # Colour-match the grey face to the region (face-swap pipelines match colour statistics).
    face = (face - face.mean()) / (face.std() + 1e-6) * region.std(axis=(0, 1)) + region.mean(axis=(0, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.sqrt(((yy - size / 2) / (size * 0.42)) ** 2 + ((xx - size / 2) / (size * 0.36)) ** 2)
    mask = (s * np.clip((1.0 - r) / 0.35, 0.0, 1.0))[..., None]  # feathered ellipse, peak alpha s
    out = x.copy()
    out[top:top + size, left:left + size] = (1 - mask) * region + mask * face
    return out


def double_jpeg(x, rng, fp, s):
    # First compression on a shifted 8×8 grid: the final JPEG's grid is then misaligned with the first.
    dy, dx = (int(v) for v in rng.integers(0, 8, size=2))
    q1 = int(rng.integers(s[0], s[1] + 1))
    shifted = np.roll(x, (dy, dx), axis=(0, 1))
    return np.roll(_jpeg(shifted, q1), (-dy, -dx), axis=(0, 1))


def diffusion_texture(x, rng, fp, s):
    smooth = _gauss(x, 1.1)
    noise = rng.standard_normal(x.shape[:2]).astype(np.float32)[..., None]
    lo, hi = fp.texture_band
    band = _gauss(noise, lo) - _gauss(noise, hi)  # band-pass "hallucinated" texture, luma only
    band *= 0.03 * s / (band.std() + 1e-6)
    return (1 - s) * x + s * smooth + band


def spectral_colour(x, rng, fp, s):
    h, w, _ = x.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pattern = np.zeros((h, w), dtype=np.float32)
    for fy, fx in fp.spectral_freqs:
        pattern += np.cos(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
    mixed = x + x @ (4.0 * s * fp.colour_matrix).T  # fixed colour-response fingerprint
    return mixed + s * pattern[..., None]


_SMOOTH_3 = np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25]).astype(np.float32)


def unseen_gan(x, rng, fp, s):
    from scipy.ndimage import convolve
    h, w, _ = x.shape
    low = x.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    up = np.repeat(np.repeat(low, 2, axis=0), 2, axis=1)  # nearest ×2, then a learned 3×3 conv
    k = _SMOOTH_3 + 0.25 * s * fp.unseen_error
    up = np.stack([convolve(up[..., c], k, mode="reflect") for c in range(3)], axis=-1)
    return (1 - s) * x + s * up


def unseen_diffusion(x, rng, fp, s):
    h, w, _ = x.shape
    dec = _resize(_resize(x, h // 4, w // 4), h, w)  # a ×4 latent decoder's loss of detail
    noise = rng.standard_normal(x.shape[:2]).astype(np.float32)[..., None]
    band = _gauss(noise, 0.5) - _gauss(noise, 1.2)
    band *= 0.03 * s / (band.std() + 1e-6)
    return (1 - 0.6 * s) * x + 0.6 * s * dec + band


def jpeg_resize(x, rng, fp, s):
    h, w, _ = x.shape
    q1 = int(rng.integers(s[0], s[1] + 1))
    factor = rng.uniform(1.05, 1.2)  # resize after compression: blocking at a non-8 period
    big = _resize(_jpeg(x, q1), int(round(h * factor)), int(round(w * factor)))
    top, left = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
    return big[top:top + h, left:left + w]


def copy_move(x, rng, fp, s):
    h, w, _ = x.shape
    size = int(rng.integers(h // 4, h // 2))
    sy, sx, ty, tx = (int(v) for v in rng.integers(0, h - size, size=4))
    # The moved block is rescaled (×1.25) like a pasted face is: the splice carries resampling blur.
    src = _resize(x[sy:sy + size * 4 // 5, sx:sx + size * 4 // 5], size, size) * rng.uniform(0.92, 1.08)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    edge = np.minimum.reduce([yy, xx, size - 1 - yy, size - 1 - xx]) / (0.25 * size)
    mask = (s * np.clip(edge, 0, 1))[..., None]
    out = x.copy()
    out[ty:ty + size, tx:tx + size] = (1 - mask) * out[ty:ty + size, tx:tx + size] + mask * src
    return out


FAMILY_FN: dict[str, Callable] = {
    "gan_upsample": gan_upsample, "face_splice": face_splice, "double_jpeg": double_jpeg,
    "diffusion_texture": diffusion_texture, "spectral_colour": spectral_colour,
    "unseen_gan": unseen_gan, "unseen_diffusion": unseen_diffusion, "copy_move": copy_move,
    "jpeg_resize": jpeg_resize,
}


class PatchMaker:
    """Draws real or forged patches from one side of the split, reproducibly from an rng."""

    def __init__(self, split: str, size: int, sources=None, faces=None, strength=None, fingerprints=None):
        assert split in ("train", "test")
        sources = sources if sources is not None else load_sources()
        names = TRAIN_SOURCES if split == "train" else TEST_SOURCES
        self.images = [img for n in names for img in sources[n]]
        faces = faces if faces is not None else load_faces()
        self.faces = faces[list(FACE_SPLIT[split])]
        self.size = size
        self.margin = max(8, size // 8)
        self.strength = dict(FAMILY_STRENGTH, **(strength or {}))
        self.fp = fingerprints or make_fingerprints()

    def _crop(self, rng) -> np.ndarray:
        work = self.size + 2 * self.margin
        while True:
            img = self.images[rng.integers(len(self.images))]
            scale = rng.uniform(0.5, 1.0)
            side = int(round(work / scale))
            h, w, _ = img.shape
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = img[top:top + side, left:left + side]
            crop = crop if side == work else _resize(crop, work, work)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            if crop.std() >= MIN_PATCH_STD:
                return np.ascontiguousarray(crop)

    def sample(self, family: Optional[str], rng) -> np.ndarray:
        """One uint8 (size, size, 3) patch; family None is a real patch."""
        x = self._crop(rng)
        if family is not None:
            s = self.strength[family]
            fn = FAMILY_FN[family]
            x = fn(x, rng, self.fp, s, self.faces) if family == "face_splice" else fn(x, rng, self.fp, s)
        m = self.margin
        x = x[m:m + self.size, m:m + self.size]
        x = _jpeg(np.clip(x, 0, 1), int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
        return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def batch(self, family: Optional[str], n: int, rng) -> np.ndarray:
        return np.stack([self.sample(family, rng) for _ in range(n)])


def build_dataset(size: int, n_train_real: int, n_train_fake: int, n_test_real: int, n_test_fake: int,
                  seed: int, families=ALL_FAMILIES, strength=None) -> dict:
    """{"train": {"real": u8[N,H,W,3], family: …}, "test": {…}}; training fakes only for TRAIN_FAMILIES."""
    sources, faces = load_sources(), load_faces()
    out = {}
    for split, n_real, n_fake in (("train", n_train_real, n_train_fake), ("test", n_test_real, n_test_fake)):
        maker = PatchMaker(split, size, sources, faces, strength)
        # One independent stream per (split, class): adding a family never changes another's patches.
        streams = np.random.SeedSequence([seed, 0 if split == "train" else 1]).spawn(1 + len(ALL_FAMILIES))
        part = {"real": maker.batch(None, n_real, np.random.default_rng(streams[0]))}
        for i, fam in enumerate(ALL_FAMILIES):
            if fam in families and (split == "test" or fam in TRAIN_FAMILIES):
                part[fam] = maker.batch(fam, n_fake, np.random.default_rng(streams[1 + i]))
        out[split] = part
    return out

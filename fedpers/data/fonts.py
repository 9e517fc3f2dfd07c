"""SYNTHETIC-RENDERED characters: 0-9, A-Z and a-z drawn from the TrueType faces bundled with matplotlib.

Every image is a 32x32 RGB picture of one character in one face, with a seeded random affine transform
(rotation, scale, shear, shift), stroke width, blur, foreground/background colours and pixel noise. The
data is synthetic: it has the structure of a real glyph-recognition task (shape classes, many faces, real
feature shift between faces) but it is not a photograph set, and every description of it says so.

Each image also carries its ``face`` (the font file's stem) and its ``writer``: a face rendered in one of
``STYLES`` rendering styles (stroke, palette, blur and noise ranges). ``natural_id`` on ``face`` gives one
client per face (20); on ``writer`` one client per (face, style) (60): feature shift between clients
without any label skew, like the domains of Digits-5 / SynthDigits in FedBN-style benchmarks.

The federated dataset (``fonts``) holds the digits only; the letters are the backbone's pretraining
source (:func:`font_letters_source`, see ``fedpers.models.pretrain_fonts``), so no federated image,
and no federated class, was ever seen by the backbone.

Rendering is vectorised (a few glyph masks per face and character, then batched ``grid_sample``), takes
seconds, and is cached as uint8 arrays under the user's cache folder (``$FEDPERS_CACHE``, else
``$XDG_CACHE_HOME/fedpers``, else ``~/.cache/fedpers``), keyed by the generator's version, the seed and a
hash of the font files (another matplotlib may ship other glyphs, which must not reuse a stale cache).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGITS = "0123456789"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# The matplotlib faces with a Latin glyph for all 62 characters. Left out: the *Display / STIXNonUni /
# STIXSiz* files (no Latin glyphs), LastResortHE (a box for every glyph), cmex10/cmsy10 (symbol faces
# whose code points map to operators) and cmmi10 (math italics: nearly cmti10).
FACES = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmb10", "cmss10", "cmtt10",
)
STYLES = 3
SIZE = 32
_CANVAS = 64  # glyphs are drawn at twice the output size and averaged down (anti-aliasing)
_STROKES = (0, 2, 4)  # extra stroke width at canvas scale: 0, 1 and 2 output pixels
VERSION = 1  # bump when the rendering changes: it is part of the cache key

# Per style: (stroke choice weights, blur sigma range, noise std range, polarity: 0 dark-on-light,
# 1 light-on-dark, 2 either). Styles differ enough that (face, style) clients see distinct domains.
_STYLE = (
    ((0.6, 0.4, 0.0), (0.0, 0.4), (0.00, 0.04), 0),
    ((0.0, 0.4, 0.6), (0.3, 0.9), (0.02, 0.08), 1),
    ((0.3, 0.4, 0.3), (0.0, 0.7), (0.04, 0.12), 2),
)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def cache_dir() -> Path:
    root = os.environ.get("FEDPERS_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedpers"


def _fonts_hash(faces: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for f in faces:
        h.update((font_dir() / f"{f}.ttf").read_bytes())
    return h.hexdigest()[:12]


def glyph_masks(chars: str, faces: tuple[str, ...] = FACES) -> np.ndarray:
    """(faces, chars, strokes, 64, 64) float32 coverage masks in [0, 1]: each glyph centred by its ink box,
    scaled per face so its capital H is 40 of the 64 pixels tall (every face fills the frame alike, and
    lowercase stays smaller than uppercase: o/O, x/X remain different classes), and shrunk further only
    if it would not fit in 56 pixels."""
    from PIL import Image, ImageDraw, ImageFont

    out = np.zeros((len(faces), len(chars), len(_STROKES), _CANVAS, _CANVAS), dtype=np.float32)
    for fi, face in enumerate(faces):
        font = ImageFont.truetype(str(font_dir() / f"{face}.ttf"), size=96)
        top, bottom = font.getbbox("H", anchor="mm")[1::2]
        face_scale = 40 / (bottom - top)
        for ci, ch in enumerate(chars):
            for si, stroke in enumerate(_STROKES):
                big = Image.new("L", (192, 192), 0)
                ImageDraw.Draw(big).text((96, 96), ch, fill=255, font=font, anchor="mm",
                                         stroke_width=2 * stroke, stroke_fill=255)
                box = big.getbbox()
                if box is None:
                    raise RuntimeError(f"face {face!r} draws nothing for {ch!r}")
                glyph = big.crop(box)
                scale = min(face_scale, 56 / max(glyph.size))
                w, h = max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale))
                glyph = glyph.resize((w, h), Image.Resampling.LANCZOS)
                canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
                canvas.paste(glyph, ((_CANVAS - w) // 2, (_CANVAS - h) // 2))
                out[fi, ci, si] = np.asarray(canvas, dtype=np.float32) / 255.0
    return out


def _blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Per-image Gaussian blur, sigmas quantised to 0.1 px so images sharing one share a convolution."""
    out = x.clone()
    q = np.round(sigma, 1)
    for s in np.unique(q):
        if s <= 0:
            continue
        idx = torch.from_numpy(np.flatnonzero(q == s))
        r = int(np.ceil(2 * s))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-(t**2) / (2 * float(s) ** 2))
        k = (k / k.sum()).to(x.dtype)
        c = x.shape[1]
        y = F.pad(x[idx], (r, r, r, r), mode="replicate")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        out[idx] = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


def render(chars: str, per_writer_class: int, seed: int, faces: tuple[str, ...] = FACES,
           augment: bool = True, masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Render ``per_writer_class`` images of every (face, style, character).

    Returns ``image`` (N, 3, 32, 32) uint8, ``label`` (N,) the character's index in ``chars``, ``face``
    (N,) face names and ``writer`` (N,) "face/sK" names. ``augment=False`` draws every glyph upright,
    centred, thin, black on white and without blur or noise (the clean templates tests compare against).
    """
    if masks is None:
        masks = glyph_masks(chars, faces)
    rng = np.random.default_rng([seed, VERSION])
    nf, nc, ns = len(faces), len(chars), STYLES
    grid = np.stack(np.meshgrid(np.arange(nf), np.arange(ns), np.arange(nc), np.arange(per_writer_class),
                                indexing="ij"), -1).reshape(-1, 4)
    fi, st, ci = grid[:, 0], grid[:, 1], grid[:, 2]
    n = len(grid)
    # Draw every random quantity for every image up front (fixed order), so chunking cannot change them.
    weights = np.array([_STYLE[s][0] for s in range(ns)])
    u = rng.uniform(size=n)
    stroke = (u[:, None] >= np.cumsum(weights, 1)[st][:, :-1]).sum(1) if augment else np.zeros(n, int)
    rot = np.deg2rad(rng.uniform(-12, 12, n))
    scale = rng.uniform(0.75, 1.05, n)
    shear = rng.uniform(-0.2, 0.2, n)
    shift = rng.uniform(-0.12, 0.12, (n, 2))
    lo = np.array([_STYLE[s][1][0] for s in st])
    hi = np.array([_STYLE[s][1][1] for s in st])
    sigma = lo + (hi - lo) * rng.uniform(size=n)
    nlo = np.array([_STYLE[s][2][0] for s in st])
    nhi = np.array([_STYLE[s][2][1] for s in st])
    noise_std = nlo + (nhi - nlo) * rng.uniform(size=n)
    pol = np.array([_STYLE[s][3] for s in st])
    light_fg = np.where(pol == 2, rng.uniform(size=n) < 0.5, pol == 1)
    # Colours: a dark and a light colour per image (random hues), so contrast never vanishes.
    dark = rng.uniform(0.0, 0.35, (n, 3))
    light = rng.uniform(0.6, 1.0, (n, 3))
    noise_seed = int(rng.integers(2**31))
    if not augment:
        rot[:] = 0
        scale[:] = 1
        shear[:] = 0
        shift[:] = 0
        sigma[:] = 0
        noise_std[:] = 0
        light_fg[:] = False
        dark[:] = 0
        light[:] = 1
    fg = np.where(light_fg[:, None], light, dark)
    bg = np.where(light_fg[:, None], dark, light)

    # Inverse affine map (output -> source coordinates in [-1, 1]) for grid_sample.
    c, s_ = np.cos(rot), np.sin(rot)
    a = np.stack([np.stack([c, -s_ + shear * c], -1), np.stack([s_, c + shear * s_], -1)], -2) / scale[:, None, None]
    theta = np.concatenate([a, shift[:, :, None]], -1).astype(np.float32)

    images = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    gen = torch.Generator().manual_seed(noise_seed)
    mask_t = torch.from_numpy(masks)
    # affine_grid's own kernel is many times slower on CPU than this einsum (same grid, to float rounding).
    t = (torch.arange(_CANVAS, dtype=torch.float32) * 2 + 1) / _CANVAS - 1
    base = torch.stack([t.repeat(_CANVAS), t.repeat_interleave(_CANVAS), torch.ones(_CANVAS * _CANVAS)], -1)
    for lo_i in range(0, n, 4096):
        sl = slice(lo_i, min(n, lo_i + 4096))
        m = mask_t[fi[sl], ci[sl], stroke[sl]].unsqueeze(1)
        g = torch.einsum("pk,njk->npj", base, torch.from_numpy(theta[sl])).view(-1, _CANVAS, _CANVAS, 2)
        m = F.grid_sample(m, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        m = F.avg_pool2d(m, _CANVAS // SIZE)
        m = _blur(m, sigma[sl])
        f = torch.from_numpy(fg[sl].astype(np.float32))[:, :, None, None]
        b = torch.from_numpy(bg[sl].astype(np.float32))[:, :, None, None]
        x = b + m * (f - b)
        x = x + torch.from_numpy(noise_std[sl].astype(np.float32))[:, None, None, None] * torch.randn(
            x.shape, generator=gen)
        images[sl] = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    face_names = np.array(faces)[fi]
    writers = np.char.add(np.char.add(face_names.astype(str), "/s"), st.astype(str))
    return {"image": images, "label": ci.astype(np.int64), "face": face_names, "writer": writers}


def _cached(kind: str, chars: str, per_writer_class: int, seed: int) -> dict[str, np.ndarray]:
    key = f"{kind}-v{VERSION}-n{per_writer_class}-seed{seed}-{_fonts_hash(FACES)}"
    path = cache_dir() / "fonts" / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = render(chars, per_writer_class, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    return out


# Images per (face, style, digit): 20 faces x 3 styles x 10 digits x 42 = 25,200 federated images,
# 420 per writer, so each of the 60 writers keeps >= 100 test images at data.test_fraction >= 0.25.
FONT_DIGITS_PER_WRITER_CLASS = 42
# Letters (pretraining source only): 20 x 3 x 52 x 10 = 31,200 images.
FONT_LETTERS_PER_WRITER_CLASS = 10
_FEDERATED_SEED, _SOURCE_SEED = 0, 1


def font_digits() -> dict[str, np.ndarray]:
    """The federated pool: the digits 0-9 (uint8 images)."""
    return _cached("digits", DIGITS, FONT_DIGITS_PER_WRITER_CLASS, _FEDERATED_SEED)


def font_letters_source() -> dict[str, np.ndarray]:
    """The backbone's pretraining source: the 52 letters, never part of a federated dataset."""
    return _cached("letters", LETTERS, FONT_LETTERS_PER_WRITER_CLASS, _SOURCE_SEED)


def to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0

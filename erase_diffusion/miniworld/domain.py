"""The miniature world's domain: flat shapes of eight kinds and eight colours, in three styles, with captions.

Everything is procedural and seeded: ``render(Scene)`` draws one 64×64 image, ``caption(scene, rng)`` writes one
caption from a handful of templates, and ``make_dataset(n, seed)`` gives the same tensors for the same seed.

Vocabulary (documented in the README too):
  shapes  circle, square, triangle, star, heart, cross, diamond, hexagon
  colours red, green, blue, yellow, purple, orange, cyan, white
  styles  solid, outlined, striped
Some shapes have paraphrases that appear in training captions ("disc", "round shape" for circle ...), so that an
erasure can be tested against them.
"""

from __future__ import annotations

import math
import re
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
COLOURS = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 225, 40),
    "purple": (155, 55, 205),
    "orange": (250, 140, 20),
    "cyan": (40, 215, 225),
    "white": (240, 240, 240),
}
STYLES = ("solid", "outlined", "striped")
# Words that mean the shape. Training captions use them, so the models know them; erasing "circle" must also
# erase "disc".
SYNONYMS = {
    "circle": ("disc", "round shape"),
    "square": ("box", "four-sided shape"),
    "triangle": ("three-sided shape",),
    "star": ("five-pointed star",),
    "heart": ("love heart",),
    "cross": ("plus sign",),
    "diamond": ("rhombus",),
    "hexagon": ("six-sided shape",),
}
STYLE_WORDS = {"solid": "solid", "outlined": "outlined", "striped": "striped"}
TEMPLATES = (
    "a {style} {colour} {shape}",
    "a {colour} {shape}",
    "a picture of a {style} {colour} {shape}",
    "a drawing of a {colour} {shape}, {style}",
    "a {style} {shape} in {colour}",
    "{colour} {shape}",
)
BACKGROUNDS = ((12, 12, 16), (30, 30, 34), (16, 22, 48), (42, 26, 16), (14, 38, 26), (36, 16, 36))


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    style: str
    cx: float  # centre, in [0, 1]
    cy: float
    radius: float  # in [0, 1] of the image size
    angle: float  # rotation in radians (shapes with symmetry hide most of it)
    background: int  # index into BACKGROUNDS


def random_scene(rng: random.Random, shape=None, colour=None, style=None) -> Scene:
    radius = rng.uniform(0.2, 0.34)
    return Scene(
        shape=shape or rng.choice(SHAPES),
        colour=colour or rng.choice(list(COLOURS)),
        style=style or rng.choice(STYLES),
        cx=rng.uniform(radius + 0.04, 1 - radius - 0.04),
        cy=rng.uniform(radius + 0.04, 1 - radius - 0.04),
        radius=radius,
        angle=rng.uniform(-0.25, 0.25),
        background=rng.randrange(len(BACKGROUNDS)),
    )


def _polygon(shape: str, n_points: int = 64) -> list[tuple[float, float]]:
    """Outline of a unit-radius shape centred at the origin (y down)."""
    if shape == "circle":
        return [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, n_points, endpoint=False)]
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(0, -1), (0.95, 0.7), (-0.95, 0.7)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(t), r * math.sin(t)))
        return pts
    if shape == "heart":
        pts = []
        for t in np.linspace(0, 2 * math.pi, n_points, endpoint=False):
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17 - 0.1))
        return pts
    if shape == "cross":
        a, b = 0.33, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    if shape == "diamond":
        return [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
    if shape == "hexagon":
        return [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, supersample: int = 4) -> Image.Image:
    """Draw the scene at ``supersample``× and downsample, for clean anti-aliased edges."""
    s = SIZE * supersample
    bg = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    colour = COLOURS[scene.colour]
    ca, sa = math.cos(scene.angle), math.sin(scene.angle)
    pts = [
        ((scene.cx + scene.radius * (x * ca - y * sa)) * s, (scene.cy + scene.radius * (x * sa + y * ca)) * s)
        for x, y in _polygon(scene.shape)
    ]
    if scene.style == "outlined":
        draw.polygon(pts, outline=colour, width=max(1, int(0.055 * s)))
    else:
        draw.polygon(pts, fill=colour)
        if scene.style == "striped":
            # diagonal background-coloured stripes, masked to the shape
            mask = Image.new("L", (s, s), 0)
            ImageDraw.Draw(mask).polygon(pts, fill=255)
            stripes = Image.new("L", (s, s), 0)
            sd = ImageDraw.Draw(stripes)
            period = int(0.14 * s)
            for off in range(-s, 2 * s, period):
                sd.line([(off, 0), (off + s, s)], fill=255, width=period // 3)
            img.paste(Image.new("RGB", (s, s), bg), (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(stripes))))
            draw.polygon(pts, outline=colour, width=max(1, int(0.035 * s)))  # keep the silhouette readable
    return img.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def shape_word(shape: str, rng: random.Random, synonym_p: float = 0.25) -> str:
    if shape in SYNONYMS and rng.random() < synonym_p:
        return rng.choice(SYNONYMS[shape])
    return shape


def caption(scene: Scene, rng: random.Random, synonym_p: float = 0.25) -> str:
    template = rng.choice(TEMPLATES)
    text = template.format(style=STYLE_WORDS[scene.style], colour=scene.colour, shape=shape_word(scene.shape, rng, synonym_p))
    return with_articles(text)


def with_articles(text: str) -> str:
    """'a orange circle' → 'an orange circle'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL → float tensor (3, H, W) in [-1, 1], the range the VAE and the judge use."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@dataclass
class Dataset:
    images: torch.Tensor  # (N, 3, 64, 64) uint8
    shape: torch.Tensor  # (N,) class indices
    colour: torch.Tensor
    style: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def float_images(self, idx=slice(None)) -> torch.Tensor:
        return self.images[idx].float() / 127.5 - 1.0


def make_dataset(n: int, seed: int, synonym_p: float = 0.25) -> Dataset:
    """``n`` scenes cycling through every (shape, colour, style) triple, in a seeded random order."""
    rng = random.Random(seed)
    triples = [(s, c, st) for s in SHAPES for c in COLOURS for st in STYLES]
    images, captions, labels = [], [], []
    for i in range(n):
        if i % len(triples) == 0:
            rng.shuffle(triples)
        s, c, st = triples[i % len(triples)]
        scene = random_scene(rng, s, c, st)
        images.append(torch.from_numpy(np.array(render(scene))).permute(2, 0, 1))
        captions.append(caption(scene, rng, synonym_p))
        labels.append((SHAPES.index(s), list(COLOURS).index(c), STYLES.index(st)))
    lab = torch.tensor(labels)
    return Dataset(torch.stack(images), lab[:, 0], lab[:, 1], lab[:, 2], captions)

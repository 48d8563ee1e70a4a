"""The "shapes" world: coloured circles, squares and triangles on a light background.

Every scene comes with its caption and one boolean mask per object, so that "the map for
'circle' lies on the circle" is a measurable fact (IoU against these masks), as DAAM measured
on annotated images.

>>> scene = random_scene(np.random.default_rng(0))
>>> scene.caption, scene.image.shape, scene.masks.shape     # (H, W, 3) uint8, (objects, H, W) bool
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (238, 236, 230)
IMAGE_SIZE = 64
# Place words for where an object's centre lies; used only when true of the scene.
PLACES = ("on the left", "on the right", "at the top", "at the bottom")


@dataclass
class ShapeObject:
    """One object: its colour and shape words, centre (x, y) and size (side / diameter) in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float
    place: str | None = None  # place phrase in the caption, if any

    @property
    def phrase(self) -> str:
        words = f"a {self.colour} {self.shape}"
        return f"{words} {self.place}" if self.place else words


@dataclass
class Scene:
    """A rendered scene: ``image`` (H, W, 3) uint8, ``masks`` (objects, H, W) bool, ``caption``."""

    objects: list[ShapeObject]
    image: np.ndarray = field(repr=False)
    masks: np.ndarray = field(repr=False)

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase for o in self.objects)


def shape_mask(shape: str, cx: float, cy: float, size: float, res: int = IMAGE_SIZE,
               supersample: int = 2) -> np.ndarray:
    """Anti-aliased coverage (res, res) in [0, 1] of one shape, by supersampling."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    n = res * supersample
    coords = (np.arange(n) + 0.5) / supersample
    x, y = np.meshgrid(coords, coords)
    half = size / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # upward isosceles triangle filling its bounding square
        top, bottom = cy - half, cy + half
        frac = (y - top) / size  # 0 at the apex, 1 at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * half)
    return inside.reshape(res, supersample, res, supersample).mean(axis=(1, 3))


def _place_of(obj: ShapeObject, res: int) -> list[str]:
    """Place phrases that are true of an object's centre (thirds of the image)."""
    places = []
    if obj.cx < res / 3:
        places.append("on the left")
    if obj.cx > 2 * res / 3:
        places.append("on the right")
    if obj.cy < res / 3:
        places.append("at the top")
    if obj.cy > 2 * res / 3:
        places.append("at the bottom")
    return places


def render(objects: list[ShapeObject], res: int = IMAGE_SIZE) -> Scene:
    """Draw objects (in order) on the light background; masks are coverage >= 0.5."""
    image = np.empty((res, res, 3), dtype=np.float32)
    image[:] = BACKGROUND
    masks = []
    for obj in objects:
        cover = shape_mask(obj.shape, obj.cx, obj.cy, obj.size, res)
        image = image * (1 - cover[..., None]) + np.array(COLOURS[obj.colour]) * cover[..., None]
        masks.append(cover >= 0.5)
    return Scene(objects, np.clip(image.round(), 0, 255).astype(np.uint8), np.stack(masks))


def random_scene(rng: np.random.Generator, n_objects: int | None = None, res: int = IMAGE_SIZE,
                 p_two: float = 0.6, p_place: float = 0.3, min_size: float = 18,
                 max_size: float = 30) -> Scene:
    """A random scene of one or two non-overlapping objects with a caption from the grammar.

    Two objects never share both colour and shape, so each caption phrase names one object.
    """
    if n_objects is None:
        n_objects = 2 if rng.random() < p_two else 1
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    objects: list[ShapeObject] = []
    attempts = 0
    while len(objects) < n_objects:
        attempts += 1
        if attempts > 50:  # the first object left no room: start the scene again
            objects, attempts = [], 0
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        if any(o.colour == colour and o.shape == shape for o in objects):
            continue
        size = float(rng.uniform(min_size, max_size))
        margin = size / 2 + 1
        for _ in range(100):
            cx, cy = rng.uniform(margin, res - margin, size=2)
            # every shape lies inside its bounding square: disjoint squares (2 px gap) never overlap
            gap = [(size + o.size) / 2 + 2 for o in objects]
            if all(abs(cx - o.cx) > g or abs(cy - o.cy) > g for o, g in zip(objects, gap)):
                break
        else:
            continue
        objects.append(ShapeObject(colour, shape, float(cx), float(cy), size))
    for obj in objects:
        places = _place_of(obj, res)
        if places and rng.random() < p_place:
            obj.place = str(rng.choice(places))
    return render(objects, res)


def scene_from_caption(caption: str, rng: np.random.Generator, res: int = IMAGE_SIZE) -> Scene:
    """A scene that fits a caption of the grammar ("a red circle and a blue square")."""
    objects = []
    for phrase in caption.split(" and "):
        words = phrase.split()
        if len(words) < 3 or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(f"{phrase!r} is not 'a COLOUR SHAPE [PLACE]' with colours "
                             f"{list(COLOURS)} and shapes {list(SHAPES)}")
        objects.append((words[1], words[2]))
    for _ in range(1000):
        scene = random_scene(rng, len(objects), res, p_place=0.0)
        for obj, (colour, shape) in zip(scene.objects, objects):
            obj.colour, obj.shape = colour, shape
        return render(scene.objects, res)
    raise RuntimeError("unreachable")


def all_prompts(two_objects: bool = True) -> list[str]:
    """Every caption of the grammar without place words (12 single, 132 ordered pairs)."""
    singles = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    if not two_objects:
        return singles
    return singles + [f"{a} and {b}" for a in singles for b in singles if a != b]


def make_dataset(n: int, seed: int = 0, res: int = IMAGE_SIZE, **kwargs):
    """``n`` random scenes as arrays: images (n, H, W, 3) uint8, masks (n, 2, H, W) bool
    (second mask empty for one-object scenes), captions list[str], and the objects."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, res, res, 3), np.uint8)
    masks = np.zeros((n, 2, res, res), bool)
    captions, objects = [], []
    for i in range(n):
        scene = random_scene(rng, res=res, **kwargs)
        images[i] = scene.image
        masks[i, : len(scene.objects)] = scene.masks
        captions.append(scene.caption)
        objects.append(scene.objects)
    return images, masks, captions, objects

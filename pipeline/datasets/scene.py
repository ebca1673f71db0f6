"""The road scenes, fixations and gaze maps of the synthetic datasets (:mod:`pipeline.datasets.synthetic`).

:class:`Scene` renders 1280x720 dashcam-like frames with a pinhole camera over a flat road (sky,
skyline, verges, a three-lane road with markings in perspective, vehicles, poles and trees, lens
blur and sensor noise; rain for DrFixD-rainy) and says where attention would go
(:class:`Target`); :func:`fixations` draws ``fixdata`` cells around the targets and
:func:`gaze_map` a BDDA gaze map of them. Deterministic given the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.datasets.bdda import GAZE_MAP_SIZE
from pipeline.datasets.spec import FRAME_SIZE

# Camera and world, in metres and pixels.
_FOCAL = 700.0
_CAMERA_HEIGHT = 1.4
_LANE = 3.5
_SPEED = 0.8  # metres per frame
_DASH_PERIOD, _DASH_LENGTH = 12.0, 4.5
_FAR = 150.0


@dataclass(frozen=True)
class _Vehicle:
    lane: float  # lateral position of the centre, metres (0 = ego lane)
    depth: float  # metres ahead at frame 0
    speed: float  # metres per frame relative to the camera
    width: float
    height: float
    color: tuple[int, int, int]


@dataclass(frozen=True)
class _Roadside:
    side: float  # lateral position, metres
    offset: float  # position along the road, metres
    kind: str  # "pole" or "tree"
    height: float
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Target:
    """A place drivers look at in one frame: centre (x, y) in pixels, spread in pixels."""

    x: float
    y: float
    spread: float
    weight: float


def fixations(rng: np.random.Generator, targets: list[Target], count: int | None) -> np.ndarray:
    """One fixdata cell: float64 ``[N, 4]`` (subject, duration ms, x, y), x/y 1-based pixels.

    ``count`` forces the number of fixations (0 or 1); otherwise 6..24.
    """
    n = int(rng.integers(6, 25)) if count is None else count
    if n == 0:
        return np.zeros((0, 4))
    weights = np.array([t.weight for t in targets])
    picks = rng.choice(len(targets), size=n, p=weights / weights.sum())
    cell = np.empty((n, 4))
    cell[:, 0] = rng.permutation(np.arange(1, n + 1))
    cell[:, 1] = np.round(rng.gamma(4.0, 60.0, n))
    for i, pick in enumerate(picks):
        target = targets[pick]
        cell[i, 2] = target.x + 1 + rng.normal(0, target.spread)
        cell[i, 3] = target.y + 1 + rng.normal(0, target.spread)
    height, width = FRAME_SIZE
    cell[:, 2] = np.clip(cell[:, 2], 1, width)
    cell[:, 3] = np.clip(cell[:, 3], 1, height)
    outside = rng.random(n) < 0.02
    for i in np.flatnonzero(outside):  # tracker noise just past an edge
        axis, limit = (2, width) if rng.random() < 0.5 else (3, height)
        cell[i, axis] = -rng.uniform(0.2, 8) if rng.random() < 0.5 else limit + rng.uniform(0.2, 8)
    return np.round(cell, 2)


def gaze_map(rng: np.random.Generator, targets: list[Target]) -> np.ndarray:
    """A BDD-A-like gaze map: uint8 ``[576, 1024]``, blurred blobs, peak 255."""
    height, width = GAZE_MAP_SIZE
    scale = width / FRAME_SIZE[1]
    ys, xs = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    weights = np.array([t.weight for t in targets])
    picks = rng.choice(len(targets), size=int(rng.integers(2, 5)), p=weights / weights.sum())
    heat = np.zeros((height, width), dtype=np.float32)
    for pick in picks:
        target = targets[pick]
        x = (target.x + rng.normal(0, target.spread / 2)) * scale
        y = (target.y + rng.normal(0, target.spread / 2)) * scale
        sigma = max(25.0, target.spread * scale) * rng.uniform(0.8, 1.3)
        column = np.exp(-0.5 * ((ys - y) / sigma) ** 2)
        row = np.exp(-0.5 * ((xs - x) / sigma) ** 2)
        heat += rng.uniform(0.5, 1.0) * np.outer(column, row)
    return np.round(heat * (255 / heat.max())).astype(np.uint8)


class Scene:
    """One video's world: static layers built once, then rendered per frame number ``t``."""

    def __init__(self, rng: np.random.Generator, *, rainy: bool, city: bool) -> None:
        height, width = FRAME_SIZE
        self.rainy = rainy
        self.horizon = float(rng.uniform(0.40, 0.46) * height)
        self.sway = (rng.uniform(15, 45), rng.uniform(80, 200), rng.uniform(0, 2 * math.pi))
        self.pad = 64  # background is wider than the frame so it can pan with the sway
        self.background = self._background(rng, city)
        self.asphalt = _texture(rng, (height, width), base=rng.uniform(85, 115), contrast=6,
                                tint=(0, 1, 3))
        self.noise = rng.normal(0, 4.5 if not rainy else 3.5,
                                (height, width + self.pad, 3)).astype(np.int16)
        self.vehicles = [
            _Vehicle(lane=float(rng.choice([-_LANE, 0.0, _LANE])), depth=float(rng.uniform(8, 90)),
                     speed=float(rng.uniform(-0.25, 0.25)), width=float(rng.uniform(1.7, 2.1)),
                     height=float(rng.uniform(1.4, 2.2)),
                     color=tuple(int(c) for c in rng.integers(20, 235, 3)))
            for _ in range(int(rng.integers(2, 6)))
        ]
        self.roadside = [
            _Roadside(side=float(sign * rng.uniform(7.5, 11)), offset=float(rng.uniform(0, 240)),
                      kind="tree" if rng.random() < 0.5 else "pole",
                      height=float(rng.uniform(5, 9)),
                      color=tuple(int(c) for c in rng.integers(30, 110, 3)))
            for sign in (-1, 1) for _ in range(int(rng.integers(4, 9)))
        ]
        self.lines = ((-_LANE / 2, True), (_LANE / 2, True), (-1.5 * _LANE, False),
                      (1.5 * _LANE, False))
        if rainy:
            self.streaks = _rain_streaks(rng, height + 256, width)
            self.drops = _rain_drops(rng, (height, width))

    def _background(self, rng: np.random.Generator, city: bool) -> np.ndarray:
        height, width = FRAME_SIZE[0], FRAME_SIZE[1] + 2 * self.pad
        horizon = int(self.horizon)
        top = rng.uniform([90, 130, 190], [140, 170, 235])
        low = rng.uniform([180, 190, 200], [225, 230, 240])
        ramp = np.linspace(0, 1, horizon, dtype=np.float32)[:, None, None]
        sky = (top * (1 - ramp) + low * ramp) * np.ones((1, width, 1), np.float32)
        clouds = cv2.resize(rng.random((6, 24)).astype(np.float32), (width, horizon),
                            interpolation=cv2.INTER_CUBIC)
        sky += 40 * np.clip(clouds - 0.5, 0, None)[..., None]
        ground = _texture(rng, (height - horizon, width), base=rng.uniform(70, 110), contrast=20,
                          tint=(-10, 15, -20))
        image = np.concatenate([np.clip(sky, 0, 255).astype(np.uint8), ground], axis=0)
        x = 0
        while x < width:  # skyline: buildings in a city, a tree line elsewhere
            w = int(rng.integers(30, 140 if city else 60))
            h = int(rng.integers(20, 120 if city else 45))
            shade = int(rng.integers(40, 130))
            if city:
                color = (shade, shade, shade + 10)
            else:
                color = (shade // 3, shade // 2 + 20, shade // 3)
            cv2.rectangle(image, (x, horizon - h), (x + w, horizon + 2), color, -1)
            if city:
                for wy in range(horizon - h + 6, horizon - 6, 14):
                    cv2.line(image, (x + 4, wy), (x + w - 4, wy), (shade + 40,) * 3, 2)
            x += w
        return image

    def _vanishing_x(self, t: int) -> float:
        amplitude, period, phase = self.sway
        return FRAME_SIZE[1] / 2 + amplitude * math.sin(2 * math.pi * t / period + phase)

    def _project(self, vx: float, lateral: float, depth: float) -> tuple[float, float]:
        """Pixel (x, y) of a road-level point ``lateral`` m to the side, ``depth`` m ahead."""
        return vx + _FOCAL * lateral / depth, self.horizon + _FOCAL * _CAMERA_HEIGHT / depth

    def _quad(self, vx: float, left: float, right: float, near: float, far: float) -> np.ndarray:
        """int32 ``[4, 2]`` corners of the road strip ``left..right`` m, ``near..far`` m ahead."""
        corners = [self._project(vx, left, near), self._project(vx, right, near),
                   self._project(vx, right, far), self._project(vx, left, far)]
        return np.round(np.array(corners)).astype(np.int32)

    def render(self, t: int) -> tuple[np.ndarray, list[Target]]:
        """Frame ``t`` (0-based): uint8 ``[720, 1280, 3]`` RGB, and where drivers would look."""
        height, width = FRAME_SIZE
        vx = self._vanishing_x(t)
        travelled = _SPEED * t
        pan = round((vx - width / 2) * 0.3)
        image = self.background[:, self.pad + pan:self.pad + pan + width].copy()

        near, far = 1.0, _FAR
        road = np.zeros((height, width), np.uint8)
        cv2.fillPoly(road, [self._quad(vx, -2.3 * _LANE, 2.3 * _LANE, near, far)], 255)
        np.copyto(image, self.asphalt, where=road[..., None].astype(bool))
        for lateral, dashed in self.lines:
            color = (235, 235, 225) if dashed else (225, 205, 90)
            if not dashed:
                cv2.fillPoly(image, [self._quad(vx, lateral - 0.08, lateral + 0.08, near, far)],
                             color, cv2.LINE_AA)
                continue
            start = -(travelled % _DASH_PERIOD)
            while start < far:
                begin, end = max(start, near), start + _DASH_LENGTH
                if end > near:
                    dash = self._quad(vx, lateral - 0.07, lateral + 0.07, begin, end)
                    cv2.fillPoly(image, [dash], color, cv2.LINE_AA)
                start += _DASH_PERIOD

        targets = [Target(vx, self.horizon + 8, 35.0, 5.0)]
        objects = []
        for vehicle in self.vehicles:
            depth = 6 + (vehicle.depth - 6 + vehicle.speed * t) % 84
            objects.append((depth, "vehicle", vehicle))
        span = 240.0
        for thing in self.roadside:
            depth = 3 + (thing.offset - travelled) % span
            objects.append((depth, thing.kind, thing))
        for depth, kind, thing in sorted(objects, key=lambda o: -o[0]):
            scale = _FOCAL / depth
            x, y = self._project(vx, thing.side if kind != "vehicle" else thing.lane, depth)
            if kind == "vehicle":
                _draw_vehicle(image, thing, x, y, scale)
                if depth < 60 and 0 <= x < width:
                    targets.append(Target(x, y - thing.height * scale / 2,
                                           max(12.0, thing.width * scale / 3), 3.0 * 30 / depth))
            else:
                _draw_roadside(image, thing, x, y, scale)
                if depth < 30 and 0 <= x < width:
                    targets.append(Target(x, y - thing.height * scale * 0.6, 20.0, 0.3))

        image = cv2.GaussianBlur(image, (0, 0), 1.6 if self.rainy else 0.8)
        if self.rainy:
            image = self._rain(image, t)
        offset = (t * 13) % self.pad
        noisy = image.astype(np.int16) + self.noise[:, offset:offset + width]
        return np.clip(noisy, 0, 255).astype(np.uint8), targets

    def _rain(self, image: np.ndarray, t: int) -> np.ndarray:
        """Darken, desaturate and haze ``image``, add falling streaks and blurring drops."""
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        # 0.55 * (0.6 * colour + 0.4 * grey) + a grey haze of 30
        dark = cv2.addWeighted(image, 0.33, cv2.merge([gray, gray, gray]), 0.22, 30)
        shift = (t * 41) % 256
        streaks = self.streaks[shift:shift + FRAME_SIZE[0]]
        dark = cv2.add(dark, cv2.merge([streaks, streaks, streaks]))
        blurred = cv2.blur(dark, (25, 25))
        return cv2.blendLinear(dark, blurred, 1 - self.drops, self.drops)


def _draw_vehicle(image: np.ndarray, vehicle: _Vehicle, x: float, y: float, scale: float) -> None:
    """A car seen from behind, bottom centre at (x, y), ``scale`` pixels per metre."""
    half, tall = vehicle.width * scale / 2, vehicle.height * scale
    left, right, bottom, top = int(x - half), int(x + half), int(y), int(y - tall)
    shadow = (int(x), int(y)), (int(half * 1.1), max(2, int(0.15 * scale)))
    cv2.ellipse(image, *shadow, 0, 0, 360, (25, 25, 28), -1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top + int(tall * 0.35)), (right, bottom - int(tall * 0.08)),
                  vehicle.color, -1, cv2.LINE_AA)
    roof = tuple(int(c * 0.8) for c in vehicle.color)
    cv2.rectangle(image, (int(x - half * 0.8), top), (int(x + half * 0.8), top + int(tall * 0.4)),
                  roof, -1, cv2.LINE_AA)
    cv2.rectangle(image, (int(x - half * 0.7), top + int(tall * 0.06)),
                  (int(x + half * 0.7), top + int(tall * 0.33)), (40, 50, 60), -1, cv2.LINE_AA)
    lamp_w, lamp_y = max(1, int(half * 0.25)), top + int(tall * 0.5)
    for side in (left + 2, right - 2 - lamp_w):
        cv2.rectangle(image, (side, lamp_y), (side + lamp_w, lamp_y + max(1, int(tall * 0.1))),
                      (200, 30, 25), -1)
    cv2.rectangle(image, (left, bottom - int(tall * 0.12)), (right, bottom - int(tall * 0.02)),
                  (30, 30, 32), -1)
    for wheel in (left + int(half * 0.15), right - int(half * 0.45)):
        cv2.rectangle(image, (wheel, bottom - int(tall * 0.08)),
                      (wheel + int(half * 0.3), bottom), (15, 15, 15), -1)


def _draw_roadside(image: np.ndarray, thing: _Roadside, x: float, y: float, scale: float) -> None:
    """A pole with a sign or a tree, foot at (x, y), ``scale`` pixels per metre."""
    top = int(y - thing.height * scale)
    trunk = max(1, int(0.25 * scale))
    if thing.kind == "pole":
        cv2.rectangle(image, (int(x) - trunk // 2, top), (int(x) + trunk // 2, int(y)),
                      (120, 120, 125), -1)
        size = max(2, int(0.8 * scale))
        cv2.rectangle(image, (int(x) - size, top), (int(x) + size, top + size), thing.color, -1)
    else:
        cv2.rectangle(image, (int(x) - trunk, int(y - thing.height * scale * 0.4)),
                      (int(x) + trunk, int(y)), (70, 50, 35), -1)
        radius = max(2, int(thing.height * scale * 0.35))
        center = (int(x), int(y - thing.height * scale * 0.65))
        cv2.circle(image, center, radius, (thing.color[0] // 2, thing.color[1] + 40,
                                           thing.color[2] // 2), -1, cv2.LINE_AA)


def _texture(rng: np.random.Generator, shape: tuple[int, int], *, base: float, contrast: float,
             tint: tuple[int, int, int]) -> np.ndarray:
    """uint8 ``[h, w, 3]`` multi-scale noise texture around grey ``base``, tinted per channel."""
    height, width = shape
    field = np.full(shape, base, dtype=np.float32)
    for cells, weight in ((8, 1.0), (40, 0.6), (160, 0.35)):
        coarse = rng.standard_normal((max(2, cells * height // width), cells)).astype(np.float32)
        field += contrast * weight * cv2.resize(coarse, (width, height),
                                                interpolation=cv2.INTER_CUBIC)
    pixels = field[..., None] + np.array(tint, dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _rain_streaks(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width]`` brightness added by slanted rain streaks (tiles vertically)."""
    layer = np.zeros((height, width), np.uint8)
    for _ in range(700):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        length = int(rng.integers(15, 45))
        cv2.line(layer, (x, y), (x + length // 5, y + length), int(rng.integers(15, 45)), 1,
                 cv2.LINE_AA)
    return layer


def _rain_drops(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """float32 ``[h, w]`` in [0, 1]: where drops on the windscreen blur the view."""
    mask = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(15, 40))):
        center = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        cv2.circle(mask, center, int(rng.integers(6, 22)), 1.0, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(mask, (0, 0), 3)

"""Chest X-ray phantoms: one frontal (PA/AP) or lateral radiograph from a flat record of parameters.

A phantom is drawn as an attenuation map in patient coordinates ``u`` (left-right, image left = patient's
right, as a radiograph is read) and ``v`` (top-down), both about [-1, 1], then mapped through a per-study
exposure (gain, gamma, heel-effect gradient, seeded noise) to uint8. Anatomy: body outline with neck and
shoulders, two lungs with vessel markings, heart, mediastinum, spine, trachea, hemidiaphragms with a gastric
bubble, posterior and anterior ribs, clavicles. Six findings have a grade 0-3 and a position inside their grade
(``<finding>_q`` in [0, 1]); their geometry (side, lobe, device paths) is always sampled, so any finding can be
switched on or off in the same patient:

=================  ================================================================================
cardiomegaly       cardiothoracic ratio: grade 0 0.40-0.50, 1 0.50-0.55, 2 0.55-0.62, 3 0.62-0.70
effusion           fluid with a meniscus filling the costophrenic angle (grade 1) up to mid lung (3)
consolidation      lobar haze bounded by a fissure, denser and larger with the grade
pneumothorax       a rim without lung markings between the chest wall and a visible pleural line
edema              1 vascular redistribution, 2 interstitial (perihilar haze, septal lines), 3 alveolar
support_devices    the number of devices: endotracheal tube, central venous catheter, nasogastric tube
=================  ================================================================================

Rendering is a pure function of the record: noise and vessel texture come from seeds stored in it, and
every step is pointwise after the attenuation map, so a changed grade alters only the pixels its finding
covers (:func:`render_counterfactual`: the true counterfactual). Lateral views show anatomy, heart size and
effusion only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

FINDINGS: tuple[str, ...] = ("cardiomegaly", "effusion", "consolidation", "pneumothorax", "edema",
                             "support_devices")
GRADES = (0, 1, 2, 3)
CTR_BY_GRADE = {0: (0.40, 0.50), 1: (0.50, 0.55), 2: (0.55, 0.62), 3: (0.62, 0.70)}  # cardiothoracic ratio
EFFUSION_HEIGHT = {0: (0.0, 0.0), 1: (0.05, 0.10), 2: (0.14, 0.26), 3: (0.30, 0.45)}  # above the angle, canvas
CONSOLIDATION_DENSITY = {0: (0.0, 0.0), 1: (0.40, 0.55), 2: (0.60, 0.75), 3: (0.80, 0.95)}
PNEUMOTHORAX_RIM = {0: (0.0, 0.0), 1: (0.05, 0.09), 2: (0.11, 0.17), 3: (0.20, 0.30)}  # shrink of the lung
LOBES = ("upper", "middle", "lower")
VIEWS = ("PA", "AP", "LATERAL")


def grade_value(table: Mapping[int, tuple[float, float]], grade: int, q: float) -> float:
    """The continuous size of a finding: ``q`` in [0, 1] places it inside its grade's interval."""
    low, high = table[int(grade)]
    return low + (high - low) * float(q)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _grid(size: int, p: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (u, v) of every pixel after the study's shift, scale and rotation; (S, S) each."""
    axis = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(np.float32)  # float32: 2x faster
    x, y = np.meshgrid(axis, axis)  # (S, S)
    angle = np.deg2rad(p["rotation_deg"])
    x, y = x - np.float32(p["shift_x"]), y - np.float32(p["shift_y"])
    cos, sin, zoom = np.float32(np.cos(angle)), np.float32(np.sin(angle)), np.float32(p["zoom"])
    u = (cos * x + sin * y) / zoom
    v = (-sin * x + cos * y) / zoom
    return u, v


def _segment_distance(u: np.ndarray, v: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance of every pixel to a polyline ``points`` (K, 2) in (u, v)."""
    best = np.full(u.shape, np.inf, dtype=u.dtype)
    corners = np.asarray(points, dtype=np.float64).tolist()  # Python floats keep the pixel arrays float32
    for (u0, v0), (u1, v1) in zip(corners[:-1], corners[1:], strict=True):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((u - u0) * du + (v - v0) * dv) / max(du * du + dv * dv, 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.hypot(u - u0 - t * du, v - v0 - t * dv))
    return best


def _bezier(start: tuple[float, float], control: tuple[float, float], end: tuple[float, float],
            steps: int = 12) -> np.ndarray:
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return (1 - t) ** 2 * np.array(start) + 2 * (1 - t) * t * np.array(control) + t**2 * np.array(end)  # (K, 2)


def _texture(seed: int, size: int, cells: int) -> np.ndarray:
    """Smooth seeded noise (S, S), unit-ish scale: a coarse Gaussian field upsampled bicubically."""
    coarse = np.random.default_rng(seed).standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)


class _Thorax:
    """The shared frontal geometry of one record: lungs, diaphragm and hila as functions of (u, v)."""

    def __init__(self, p: Mapping[str, Any], edge: float) -> None:
        self.p, self.edge = p, edge
        self.half = p["thorax_half_width"]
        self.inspiration = p["diaphragm_level"] - (0.05 if p["view"] == "AP" else 0.0)  # portable: less inspiration

    def hemithorax(self, side: int) -> tuple[float, float, float]:
        """(centre u, half width, mediastinal u) of the right (side -1) or left (side +1) hemithorax."""
        medial = side * self.p["mediastinum_half_width"]
        lateral = side * (self.half - self.p["chest_wall"])
        return 0.5 * (medial + lateral), 0.5 * abs(lateral - medial), medial

    def dome(self, u: np.ndarray, side: int) -> np.ndarray:
        """v of the hemidiaphragm under ``u``; the right dome sits higher."""
        centre, half, _ = self.hemithorax(side)
        a = (u - centre) / half
        level = self.inspiration - (self.p["right_dome_lift"] if side < 0 else 0.0)
        return level - self.p["dome_height"] * (1.0 - np.clip(a, -1.4, 1.4) ** 2) + 0.05 * np.maximum(a * side, 0)

    def lung(self, u: np.ndarray, v: np.ndarray, side: int) -> np.ndarray:
        """Soft mask of one lung (no heart cut-out): rounded apex, chest wall, mediastinum, dome."""
        centre, half, medial = self.hemithorax(side)
        a = (u - centre) / half
        top = self.p["apex_level"] + 0.22 * a**2
        cut_mediastinum = _sigmoid(side * (u - medial) / self.edge)
        taper = 0.28 * half * np.exp(-np.maximum(v - self.p["apex_level"], 0.0) / 0.35)  # narrower towards the apex
        cut_wall = _sigmoid((side * (centre + side * half) - side * u - taper) / self.edge)
        return _sigmoid((v - top) / self.edge) * _sigmoid((self.dome(u, side) - v) / self.edge) \
            * cut_mediastinum * cut_wall

    def hilum(self, side: int) -> tuple[float, float]:
        _, _, medial = self.hemithorax(side)
        return medial + side * 0.10, self.p["apex_level"] + 0.42 * (self.inspiration - self.p["apex_level"])


def _heart(p: Mapping[str, Any], thorax: _Thorax, u: np.ndarray, v: np.ndarray, edge: float) -> np.ndarray:
    ctr = grade_value(CTR_BY_GRADE, p["cardiomegaly_grade"], p["cardiomegaly_q"])
    width = ctr * 2.0 * thorax.half * (1.08 if p["view"] == "AP" else 1.0)  # AP magnifies the heart
    centre_u = p["heart_shift"] + 0.18 * width  # two thirds of the heart lie left of the midline
    base = thorax.inspiration - 0.04
    height = 0.26 + 0.30 * width
    tilt = 0.25 * (u - centre_u)  # the long axis runs down to the left
    r = np.hypot((u - centre_u) / (0.5 * width), (v - tilt - (base - 0.25 * height)) / (0.6 * height))  # sits on
    # the diaphragm: the lower part of the ellipse merges into the abdomen
    return _sigmoid((1.0 - r) * 0.5 * width / edge) * _sigmoid((base + 0.06 - v) / edge)


def _effusion(p: Mapping[str, Any], thorax: _Thorax, u: np.ndarray, v: np.ndarray, side: int,
              edge: float) -> np.ndarray:
    height = grade_value(EFFUSION_HEIGHT, p["effusion_grade"], p["effusion_q"])
    if height <= 0 or p["effusion_side"] not in (side, 0):
        return np.zeros_like(u)
    centre, half, _ = thorax.hemithorax(side)
    lateral = np.clip(side * (u - centre) / half, -1.0, 1.0)  # -1 medial .. 1 lateral
    angle_v = float(thorax.dome(np.asarray(centre + side * half), side))  # the costophrenic angle
    level = angle_v - height - 0.06 * (lateral + 1.0) ** 2 * (0.5 + height)  # meniscus climbs laterally
    return _sigmoid((v - level) / (1.5 * edge))


def _consolidation(p: Mapping[str, Any], thorax: _Thorax, u: np.ndarray, v: np.ndarray, side: int,
                   texture: np.ndarray) -> np.ndarray:
    density = grade_value(CONSOLIDATION_DENSITY, p["consolidation_grade"], p["consolidation_q"])
    if density <= 0 or p["consolidation_side"] != side:
        return np.zeros_like(u)
    centre, half, _ = thorax.hemithorax(side)
    top, bottom = p["apex_level"], thorax.inspiration
    zone = {"upper": 0.22, "middle": 0.55, "lower": 0.82}[p["consolidation_lobe"]]
    cv = top + zone * (bottom - top)
    cu = centre + side * p["consolidation_offset"] * half
    radius = (0.5 + 0.2 * p["consolidation_grade"]) * half * 1.2
    blob = np.exp(-((((u - cu) / radius) ** 2 + ((v - cv) / (0.8 * radius)) ** 2) ** 2))  # flat-topped: lobar
    fissure = _sigmoid((v - (cv - 0.8 * radius + 0.15 * side * (u - cu))) / 0.02) if p["consolidation_lobe"] \
        != "upper" else _sigmoid((cv + 0.8 * radius - v) / 0.02)  # a sharp lobar border on one side
    return np.clip(density * blob * fissure * (0.85 + 0.3 * texture), 0.0, 0.95)


def _edema(p: Mapping[str, Any], thorax: _Thorax, u: np.ndarray, v: np.ndarray, side: int,
           texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(haze filling air, extra vessel-marking gain) of one lung."""
    grade, q = int(p["edema_grade"]), float(p["edema_q"])
    if grade == 0:
        return np.zeros_like(u), np.zeros_like(u)
    hu, hv = thorax.hilum(side)
    upper = _sigmoid((hv - v) / 0.08)
    redistribution = (0.6 + 0.4 * q) * upper  # grade 1+: upper-zone vessels as wide as lower-zone ones
    perihilar = np.exp(-(((u - hu) / 0.30) ** 2 + ((v - hv - 0.05) / 0.35) ** 2))
    haze = np.zeros_like(u)
    if grade >= 2:
        _, _, medial = thorax.hemithorax(side)
        periphery = _sigmoid((np.abs(u) - (thorax.half - p["chest_wall"] - 0.12)) / 0.03) * _sigmoid((v - hv) / 0.1)
        septal = (0.5 + 0.5 * np.cos(2 * np.pi * (v + 0.02 * texture) / 0.035)) ** 12 * periphery  # Kerley B lines
        haze = (0.25 + 0.1 * q) * perihilar + 0.3 * septal
    if grade >= 3:
        batwing = np.exp(-(((u - hu) / (0.42 + 0.1 * q)) ** 2 + ((v - hv) / 0.45) ** 2))
        haze = haze + (0.45 + 0.2 * q) * batwing * (0.9 + 0.2 * texture)
    return np.clip(haze, 0.0, 0.9), redistribution


def _pneumothorax(p: Mapping[str, Any], thorax: _Thorax, u: np.ndarray, v: np.ndarray,
                  side: int) -> tuple[np.ndarray, np.ndarray]:
    """(air rim without markings, pleural line) of one side; the lung shrinks towards a point below the hilum."""
    rim = grade_value(PNEUMOTHORAX_RIM, p["pneumothorax_grade"], p["pneumothorax_q"])
    if rim <= 0 or p["pneumothorax_side"] != side:
        return np.zeros_like(u), np.zeros_like(u)
    hu, hv = thorax.hilum(side)
    anchor_u, anchor_v = hu, thorax.inspiration - 0.08  # the lung falls away from the apex and the lateral wall
    scale = 1.0 - rim * 1.6
    shrunk = thorax.lung(anchor_u + (u - anchor_u) / scale, anchor_v + (v - anchor_v) / scale, side)
    whole = thorax.lung(u, v, side)
    line = np.exp(-((shrunk - 0.5) / 0.22) ** 2) * np.clip(2.0 * (whole - shrunk), 0.0, 1.0)
    return np.clip(whole - shrunk, 0.0, 1.0), line


def _devices(p: Mapping[str, Any], thorax: _Thorax, u: np.ndarray, v: np.ndarray, count: int) -> np.ndarray:
    """Bright thin lines: endotracheal tube, right internal jugular central line, nasogastric tube (in order)."""
    out = np.zeros_like(u)
    jitter = p["device_jitter"]
    carina = p["apex_level"] + 0.30
    paths = [
        np.array([[0.01 + jitter * 0.05, -1.2], [0.0 + jitter * 0.04, carina - 0.10 - 0.06 * abs(jitter)]]),
        _bezier((-0.30 - 0.05 * jitter, -1.15), (-0.12, -0.70), (-0.05 + 0.02 * jitter, carina + 0.12)),
        _bezier((0.02, -1.2), (0.04 + 0.03 * jitter, 0.2), (0.22 + 0.05 * jitter, thorax.inspiration + 0.22)),
    ]
    widths = (0.012, 0.007, 0.008)
    for path, width in list(zip(paths, widths, strict=True))[:count]:
        distance = _segment_distance(u, v, path)
        out = np.maximum(out, np.exp(-((distance / width) ** 2)))
    return out


def _ribs(p: Mapping[str, Any], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Posterior ribs (arcs rising medially) and fainter anterior ribs, as periodic bands (S, S)."""
    spacing = p["rib_spacing"]
    a = np.abs(u)
    posterior = (v - p["apex_level"] + 0.02 + 0.40 * a - 0.50 * a**2) / spacing  # up from the spine, then down
    anterior = (v - p["apex_level"] - 0.10 + 0.30 * a) / (1.3 * spacing)  # down towards the sternum
    bands = (0.5 + 0.5 * np.cos(2 * np.pi * posterior)) ** 6 + 0.45 * (0.5 + 0.5 * np.cos(2 * np.pi * anterior)) ** 8
    return bands


def _frontal_attenuation(p: Mapping[str, Any], size: int) -> np.ndarray:
    """Attenuation map (S, S), about [0, 1]: bright = dense."""
    u, v = _grid(size, p)
    edge = 2.0 / size * 0.8 / p["zoom"]
    thorax = _Thorax(p, edge)
    half = thorax.half
    shoulders = p["neck_half_width"] + (half + 0.45 - p["neck_half_width"]) * _sigmoid((v - p["apex_level"] + 0.14)
                                                                                       / 0.04)
    shoulders = shoulders - 0.22 * _sigmoid((v - p["apex_level"] - 0.25) / 0.12)  # arms leave the frame
    body = _sigmoid((shoulders - np.abs(u)) / (3 * edge))
    lateral_tissue = np.clip((np.abs(u) - half + 0.1) / 0.3, 0.0, 1.0)  # axillae and arms: thicker at the sides
    att = p["soft_tissue"] * body * (1.0 + 0.15 * _sigmoid((v - thorax.inspiration) / 0.05) + 0.12 * lateral_tissue)
    vessels = _texture(p["texture_seed"], size, 40)
    patches = _texture(p["texture_seed"] + 1, size, 12)
    # ridges (zero crossings) of a smooth field: branching, vessel-like lines
    markings_base = np.exp(-(np.abs(vessels) / 0.16) ** 2) * (0.6 + 0.4 * patches)
    heart = _heart(p, thorax, u, v, edge)
    devices = _devices(p, thorax, u, v, int(p["support_devices_grade"]))
    lungs = np.zeros_like(u)
    for side in (-1, 1):
        lung = thorax.lung(u, v, side) * (1.0 - heart)
        hu, hv = thorax.hilum(side)
        near_hilum = np.exp(-(((u - hu) / 0.45) ** 2 + ((v - hv) / 0.6) ** 2))
        haze, redistribution = _edema(p, thorax, u, v, side, patches)
        ptx_air, pleural_line = _pneumothorax(p, thorax, u, v, side)
        fluid = _effusion(p, thorax, u, v, side, edge)
        cons = _consolidation(p, thorax, u, v, side, patches)
        filled = 1.0 - (1.0 - fluid) * (1.0 - cons) * (1.0 - haze)
        lung_markings = markings_base * (0.35 + 0.65 * near_hilum) * (1.0 + 0.9 * redistribution)
        air = lung * (1.0 - filled)
        att = att - p["lung_air"] * air * (1.0 - 0.30 * lung_markings * (1.0 - ptx_air)) - 0.10 * ptx_air \
            + 0.22 * pleural_line * (1.0 - fluid)
        lungs = lungs + lung
        gastric = np.exp(-(((u - 0.33 * half) / 0.09) ** 2 + ((v - thorax.inspiration - 0.13) / 0.06) ** 2))
        att = att - (0.12 * gastric * p["gastric_bubble"] if side > 0 else 0.0)
    att = att + 0.04 * heart
    spine = _sigmoid((0.065 - np.abs(u)) / edge) * (0.9 + 0.1 * np.cos(2 * np.pi * v / p["rib_spacing"] / 1.1))
    trachea = _sigmoid((0.028 - np.abs(u - 0.01)) / edge) * _sigmoid((p["apex_level"] + 0.32 - v) / 0.03)
    thorax_box = _sigmoid((half + 0.02 - np.abs(u)) / edge) * _sigmoid((v - p["apex_level"] + 0.08) / 0.03) \
        * _sigmoid((thorax.inspiration + 0.05 - v) / 0.04)
    clavicles = np.zeros_like(u)
    for side in (-1, 1):
        start = (side * 0.07, p["apex_level"] + 0.07)
        end = (side * (half * 0.85), p["apex_level"] - 0.02 + p["clavicle_tilt"])
        clavicles = np.maximum(clavicles, np.exp(-(_segment_distance(u, v, np.array([start, end])) / 0.022) ** 4))
    ribs = 0.55 * _ribs(p, u, v) * thorax_box * (0.35 + 0.65 * lungs)  # most visible against the lungs
    att = att + 0.10 * spine - 0.10 * trachea + p["bone"] * (ribs + clavicles) * body
    return att + p["device_brightness"] * devices


def _lateral_attenuation(p: Mapping[str, Any], size: int) -> np.ndarray:
    """A lateral view (anterior to the image left): thorax oval, spine, sternum, heart, domes, effusion."""
    u, v = _grid(size, p)
    edge = 2.0 / size * 0.8 / p["zoom"]
    half = p["thorax_half_width"] * 0.95
    r = np.hypot(u / half, (v - 0.05) / 0.95)
    body = _sigmoid((1.0 - r) / (3 * edge / half))
    dome = p["diaphragm_level"] - p["dome_height"] * (1.0 - np.clip(u / half, -1, 1) ** 2) + 0.08 * (u / half)
    lung = _sigmoid((0.92 - np.hypot(u / (half * 0.92), (v + 0.05) / 0.9)) / 0.02) * _sigmoid((dome - v) / edge)
    ctr = grade_value(CTR_BY_GRADE, p["cardiomegaly_grade"], p["cardiomegaly_q"])
    heart = _sigmoid((1.0 - np.hypot((u + 0.25 * half) / (0.9 * ctr * half * 1.2), (v - dome + 0.22) / 0.3))
                     / 0.05)
    fluid = np.zeros_like(u)
    height = grade_value(EFFUSION_HEIGHT, p["effusion_grade"], p["effusion_q"])
    if height > 0:
        fluid = _sigmoid((v - (p["diaphragm_level"] + 0.05 - height * 1.2 - 0.15 * u / half)) / (1.5 * edge)) \
            * _sigmoid((u - 0.2 * half) / 0.05)  # posterior costophrenic angle
    spine = _sigmoid((0.12 - np.abs(u - 0.78 * half)) / edge) * (0.85 + 0.15 * np.cos(2 * np.pi * v / 0.09))
    sternum = _sigmoid((0.03 - np.abs(u + 0.93 * half + 0.02 * v)) / edge) * _sigmoid((0.2 - v) / 0.05)
    air = lung * (1.0 - heart) * (1.0 - fluid)
    att = p["soft_tissue"] * body * 1.1 - p["lung_air"] * 0.75 * air + 0.15 * spine + 0.08 * sternum
    return att


def render(params: Mapping[str, Any], size: int | None = None) -> np.ndarray:
    """The phantom described by ``params`` (a flat record, e.g. a row of the parameter table) as uint8 (S, S)."""
    params = {k: v.item() if isinstance(v, np.generic) else v for k, v in params.items()}  # table rows: numpy
    size = int(size if size is not None else params["size"])
    frontal = params["view"] != "LATERAL"
    att = _frontal_attenuation(params, size) if frontal else _lateral_attenuation(params, size)
    y = np.linspace(-1, 1, size, dtype=np.float32)[:, None]  # (S, 1)
    att = att * (1.0 + np.float32(params["heel"]) * y)  # anode heel effect: a smooth top-bottom exposure gradient
    image = np.clip(np.float32(params["gain"]) * att + np.float32(params["offset"]), 0.0, 1.0) \
        ** np.float32(params["gamma"])
    noise = np.random.default_rng(int(params["noise_seed"])).standard_normal((size, size), dtype=np.float32)
    image = image + np.float32(params["noise_std"]) * noise
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def render_counterfactual(params: Mapping[str, Any], finding: str, new_severity: int,
                          size: int | None = None) -> np.ndarray:
    """The true counterfactual: the same patient, exposure and noise with ``finding`` at grade ``new_severity``."""
    if finding not in FINDINGS:
        raise ValueError(f"finding {finding!r}: expected one of {FINDINGS}")
    if int(new_severity) not in GRADES:
        raise ValueError(f"severity {new_severity!r} of {finding}: expected one of {GRADES}")
    return render({**params, f"{finding}_grade": int(new_severity)}, size)

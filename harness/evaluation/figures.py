"""Figures for the evaluation report: image grids, counterfactual strips and GIFs, difference maps, ROC,
calibration, confusion matrices, latent maps (paper Fig. 7) and loss curves.

Every function renders with matplotlib's Agg backend (no display needed), writes its file atomically (a
temporary file in the same folder, then ``os.replace``) and returns the final ``Path``. Images are taken as
(N, C, H, W) or (C, H, W) arrays or tensors in [-1, 1]; C = 1 is shown with a grayscale colormap.

Inside ``with marked_figures("NOT READY: ...")`` every figure saved carries that line in red above it and every
GIF frame a red border: counterfactuals of a model that is not ready (``harness.evaluation.readiness``) are
marked as such wherever they are shown.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: figures are written to files only, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

DPI = 100
MAX_LATENT_POINTS = 2000  # t-SNE is O(N log N) but slow on 2 cores beyond a few thousand points
MARK_COLOUR = "#c00000"
_MARK: ContextVar[str | None] = ContextVar("figure_mark", default=None)


@contextmanager
def marked_figures(text: str | None) -> Iterator[None]:
    """Mark every figure saved inside the block with ``text`` (red, above the figure; GIFs: a red border).
    ``None`` leaves them unmarked, so a caller can pass its verdict through unconditionally."""
    token = _MARK.set(text)
    try:
        yield
    finally:
        _MARK.reset(token)


def _as_numpy(array: Any) -> np.ndarray:
    """numpy view of an array or a (possibly CUDA / grad-tracking) torch tensor, without importing torch."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def _images_hwc(images: Any) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) in [-1, 1] -> (N, H, W) or (N, H, W, 3) in [0, 1] for imshow."""
    array = _as_numpy(images).astype(np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C in (1, 3), got shape {array.shape}")
    array = np.clip((array + 1.0) / 2.0, 0.0, 1.0)
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


def _show(ax: plt.Axes, image_hw: np.ndarray, title: str | None = None) -> None:
    ax.imshow(image_hw, cmap="gray" if image_hw.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically and close it (with the active mark of :func:`marked_figures`)."""
    path = Path(path)
    mark = _MARK.get()
    if mark:  # above everything else, suptitle included; bbox_inches="tight" grows the canvas to hold it
        fig.text(0.5, 1.0, textwrap.fill(mark, 70), color=MARK_COLOUR, fontsize=11, fontweight="bold",
                 ha="center", va="bottom")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def save_image_grid(images: Any, path: str | Path, nrow: int = 8, titles: Sequence[str] | None = None,
                    suptitle: str | None = None) -> Path:
    """Images (N, C, H, W) in [-1, 1] in a grid of ``nrow`` images per row, optionally titled each."""
    frames = _images_hwc(images)
    n = frames.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    ncol = max(1, min(nrow, n))
    nrows = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrows, ncol, figsize=(1.4 * ncol, 1.5 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, frames[i], None if titles is None else titles[i])
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)


def _strip_row(axes: Sequence[plt.Axes], frames: np.ndarray, grade_labels: Sequence[Any],
               input_frame: np.ndarray | None, input_label: str) -> None:
    """Fill one row of axes: the optional input first, then one frame per grade with its label underneath."""
    offset = 0
    if input_frame is not None:
        _show(axes[0], input_frame)
        axes[0].set_xlabel(input_label, fontsize=9, fontweight="bold")
        offset = 1
    for i, frame in enumerate(frames):
        _show(axes[offset + i], frame)
        label = grade_labels[i]  # a number is a grade; a string is shown as given (e.g. a signed distance)
        axes[offset + i].set_xlabel(label if isinstance(label, str) else f"grade {label}", fontsize=9)


def save_strip(frames: Any, path: str | Path, grade_labels: Sequence[Any], input_image: Any | None = None,
               input_label: str = "input", title: str | None = None) -> Path:
    """One progression strip (G, C, H, W) as one row, the grade under each frame; the input in a first column."""
    strip = _images_hwc(frames)
    if len(grade_labels) != strip.shape[0]:
        raise ValueError(f"{len(grade_labels)} grade labels for a strip of {strip.shape[0]} frames")
    input_frame = None if input_image is None else _images_hwc(input_image)[0]
    ncol = strip.shape[0] + (input_frame is not None)
    fig, axes = plt.subplots(1, ncol, figsize=(1.4 * ncol, 1.8), squeeze=False)
    _strip_row(axes[0], strip, grade_labels, input_frame, input_label)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_strips(strips: Sequence[Any], path: str | Path, row_titles: Sequence[str],
                grade_labels: Sequence[Any] | None = None, inputs: Any | None = None) -> Path:
    """Several images' strips (each (G, C, H, W), same G) as rows of one figure; optional inputs (N, C, H, W)."""
    if len(strips) == 0:
        raise ValueError("save_strips needs at least one strip")
    if len(row_titles) != len(strips):
        raise ValueError(f"{len(row_titles)} row titles for {len(strips)} strips")
    rows = [_images_hwc(s) for s in strips]
    n_frames = rows[0].shape[0]
    if any(r.shape[0] != n_frames for r in rows):
        raise ValueError(f"strips differ in length: {[r.shape[0] for r in rows]}")
    grade_labels = list(range(n_frames)) if grade_labels is None else list(grade_labels)
    input_frames = None if inputs is None else _images_hwc(inputs)
    ncol = n_frames + (input_frames is not None)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.4 * ncol, 1.7 * len(rows)), squeeze=False)
    for r, (strip, row_title) in enumerate(zip(rows, row_titles, strict=True)):
        _strip_row(axes[r], strip, grade_labels, None if input_frames is None else input_frames[r], "input")
        # wrapped: a long title set along the row's height would run into the rows above and below
        axes[r][0].set_ylabel("\n".join(textwrap.wrap(row_title, 16)) or row_title, fontsize=8)
    return _save(fig, path)


def save_gif(frames: Any, path: str | Path, duration_ms: int = 400, min_size: int = 128) -> Path:
    """Animated, looping GIF of frames (G, C, H, W) in [-1, 1], upscaled (nearest) to at least ``min_size`` px."""
    images = (_images_hwc(frames) * 255.0).round().astype(np.uint8)
    scale = max(1, int(np.ceil(min_size / images.shape[1])))
    pil_frames = []
    for image in images:
        pil = Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB")
        pil_frames.append(pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST))
    if _MARK.get():  # a GIF holds no text line: a red border marks each frame
        pil_frames = [frame.convert("RGB") for frame in pil_frames]
        for frame in pil_frames:
            ImageDraw.Draw(frame).rectangle([0, 0, frame.width - 1, frame.height - 1], outline=MARK_COLOUR,
                                            width=max(2, frame.width // 40))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    pil_frames[0].save(tmp, format="GIF", save_all=True, append_images=pil_frames[1:], duration=duration_ms, loop=0)
    os.replace(tmp, path)
    return path


# ITU-R BT.601 luma weights: the brightness a viewer perceives, so a change of hue alone shows as small.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def luminance(image: Any) -> np.ndarray:
    """One image (C, H, W) or (1, C, H, W) in [-1, 1] -> (H, W): the image itself (C=1) or its BT.601 luma (C=3)."""
    array = _as_numpy(image).astype(np.float32)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of shape {array.shape}")
        array = array[0]
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (C, H, W) with C in (1, 3), got shape {array.shape}")
    return array[0] if array.shape[0] == 1 else np.tensordot(LUMA_WEIGHTS, array, axes=1)


def save_difference_map(x: Any, x_ce: Any, path: str | Path, alpha: float = 0.6, title: str | None = None) -> Path:
    """Input, counterfactual, and the signed difference (CE - input) over the input's brightness.

    The difference uses a diverging colormap (RdBu_r: red where the counterfactual is brighter) with limits
    symmetric about zero, so equal colour means equal magnitude of change in either direction. RGB images are
    shown in colour; their difference is that of the BT.601 luminance, and the panel title says so.
    """
    inp_hwc, ce_hwc = _images_hwc(x)[0], _images_hwc(x_ce)[0]  # (H, W) or (H, W, 3) in [0, 1]
    if inp_hwc.shape != ce_hwc.shape:
        raise ValueError(f"input {inp_hwc.shape} and counterfactual {ce_hwc.shape} differ in size")
    inp, ce = luminance(x), luminance(x_ce)  # (H, W) each, in [-1, 1]
    diff = ce - inp
    limit = float(np.abs(diff).max()) or 1e-6  # an all-zero difference still gets a valid colour scale
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
    _show(axes[0], inp_hwc, "input")
    _show(axes[1], ce_hwc, "counterfactual")
    caption = "difference (CE - input)" if inp_hwc.ndim == 2 else "luminance difference (CE - input)"
    _show(axes[2], (inp + 1) / 2, caption)
    overlay = axes[2].imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=alpha, interpolation="nearest")
    fig.colorbar(overlay, ax=axes[2], fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def save_roc(curves: Mapping[str, tuple[Any, Any, float]], path: str | Path, title: str = "ROC") -> Path:
    """ROC curves: ``{name: (fpr, tpr, auc)}``, with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(_as_numpy(fpr), _as_numpy(tpr), label=f"{name} (AUC {float(auc):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def save_calibration(dist: Any, grades: Any, calibration: Any, path: str | Path,
                     title: str = "distance to hyperplane per grade") -> Path:
    """Signed distance per true grade (box + jittered points) with the fitted distance -> grade curve."""
    dist, grades = _as_numpy(dist).astype(np.float64).ravel(), _as_numpy(grades).ravel()
    if dist.shape != grades.shape:
        raise ValueError(f"{dist.shape[0]} distances for {grades.shape[0]} grades")
    levels = np.unique(grades)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.boxplot([dist[grades == g] for g in levels], positions=levels.astype(float), orientation="horizontal",
               widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=dist.shape)  # fixed seed: same figure each run
    ax.scatter(dist, grades.astype(float) + jitter, s=6, alpha=0.35, color="tab:blue", label="samples")
    margin = 0.1 * (dist.max() - dist.min() + 1e-6)
    span = np.linspace(dist.min() - margin, dist.max() + margin, 200)
    ax.plot(span, _as_numpy(calibration.grade_continuous(span)), color="tab:red", label="calibration")
    ax.set_yticks(levels.astype(float))
    ax.set_yticklabels([str(g) for g in levels])
    ax.set_xlabel("signed distance to hyperplane")
    ax.set_ylabel("grade")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def save_confusion(cm: Any, labels: Sequence[Any], path: str | Path, title: str = "confusion matrix") -> Path:
    """Confusion matrix (rows = true, columns = predicted) with the count in each cell."""
    cm = _as_numpy(cm)
    if cm.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {len(labels)} labels")
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    threshold = cm.max() / 2 if cm.size else 0
    fractional = np.issubdtype(cm.dtype, np.floating) and not np.all(cm == np.round(cm))  # e.g. row-normalized
    for (i, j), count in np.ndenumerate(cm):
        text = f"{count:.2f}" if fractional else f"{int(count)}"
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if count > threshold else "black")
    ax.set_xticks(range(len(labels)), [str(label) for label in labels])
    ax.set_yticks(range(len(labels)), [str(label) for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def embed_2d(z: Any, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """Latents (N, D) -> (N, 2): PCA to at most 50 dimensions, then t-SNE (``"tsne"``) or the first 2 PCs."""
    from sklearn.decomposition import PCA  # local: scikit-learn is slow to import and only needed here
    from sklearn.manifold import TSNE

    z = _as_numpy(z).astype(np.float64)
    n, d = z.shape
    if method not in ("tsne", "pca"):
        raise ValueError(f"unknown latent map method {method!r}: use 'tsne' or 'pca'")
    if n < 3:
        raise ValueError(f"a latent map needs at least 3 points, got {n}")
    reduced = PCA(n_components=min(50 if method == "tsne" else 2, n, d), random_state=seed).fit_transform(z)
    if method == "pca":
        return reduced[:, :2] if reduced.shape[1] >= 2 else np.c_[reduced, np.zeros(n)]
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))  # t-SNE requires perplexity < N
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def _is_categorical(values: np.ndarray) -> bool:
    return values.dtype.kind in "biuUSO" or (values.dtype.kind == "f" and np.all(values == np.round(values))
                                             and np.unique(values).size <= 12)


def level_name(level: Any, names: Mapping[Any, str] | Sequence[str] | None = None) -> str:
    """A legend entry: the name given for ``level`` (a mapping, or a sequence indexed by integer levels), else the
    level itself, with whole-number floats written as integers (a label stored as 1.0 reads "1")."""
    value = level.item() if hasattr(level, "item") else level
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if names is not None:
        if isinstance(names, Mapping):
            for key in (value, str(value)):
                if key in names:
                    return str(names[key])
        elif isinstance(value, int) and 0 <= value < len(names):
            return str(names[value])
    return str(value)


def save_latent_map(z: Any, colour_by: Mapping[str, Any], path: str | Path, method: str = "tsne", seed: int = 0,
                    max_points: int = MAX_LATENT_POINTS,
                    level_names: Mapping[str, Mapping[Any, str] | Sequence[str]] | None = None) -> Path:
    """2-D map of latents (N, D), one panel per colouring (e.g. label and grade), as in the paper's Fig. 7.

    Above ``max_points`` a fixed-seed random subset is drawn, so the map is reproducible and fast.
    ``level_names`` names the levels of a colouring in its legend (e.g. ``{"label": ["normal", "pneumonia"]}``).
    """
    z = _as_numpy(z)
    columns = {name: _as_numpy(values).ravel() for name, values in colour_by.items()}
    for name, values in columns.items():
        if values.shape[0] != z.shape[0]:
            raise ValueError(f"colouring {name!r} has {values.shape[0]} values for {z.shape[0]} latents")
    if z.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(z.shape[0], size=max_points, replace=False))
        z, columns = z[keep], {name: values[keep] for name, values in columns.items()}
    xy = embed_2d(z, method=method, seed=seed)  # (N, 2)
    method_name = {"tsne": "t-SNE", "pca": "PCA"}[method]
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(4.2 * max(1, len(columns)), 3.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], columns.items(), strict=True):
        if _is_categorical(values):
            for level in np.unique(values):
                mask = values == level
                ax.scatter(xy[mask, 0], xy[mask, 1], s=8, alpha=0.7,
                           label=level_name(level, (level_names or {}).get(name)))
            ax.legend(title=name, fontsize=7, title_fontsize=8, markerscale=1.5, loc="best")
        else:
            points = ax.scatter(xy[:, 0], xy[:, 1], c=values.astype(float), s=8, alpha=0.7, cmap="viridis")
            fig.colorbar(points, ax=ax, label=name)
        ax.set_title(f"{method_name} of z_sem, by {name}", fontsize=10)
        ax.set_xlabel(f"{method_name} 1")
        ax.set_ylabel(f"{method_name} 2")
    return _save(fig, path)


def save_loss_curve(steps: Any, losses: Any, path: str | Path, title: str = "training loss",
                    smooth: int = 0) -> Path:
    """Loss against step (log-scaled y when all losses are positive), optionally with a moving average."""
    steps, losses = _as_numpy(steps).ravel(), _as_numpy(losses).astype(np.float64).ravel()
    if steps.shape != losses.shape:
        raise ValueError(f"{steps.shape[0]} steps for {losses.shape[0]} losses")
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.plot(steps, losses, linewidth=0.8, alpha=0.5 if smooth > 1 else 1.0, label="loss")
    if 1 < smooth <= losses.size:
        kernel = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(losses, kernel, mode="valid"), linewidth=1.5,
                label=f"moving average ({smooth})")
        ax.legend(fontsize=8)
    if losses.size and np.all(losses > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    return _save(fig, path)

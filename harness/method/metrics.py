"""Metrics: detection (AUC, F1, ...), grading (macro-F1, MAE), image similarity (LPIPS, FID) and CE metrics.

Detection and grading metrics are plain numpy / scikit-learn. LPIPS and FID need pretrained networks whose
weights cannot be downloaded at run time: they are looked up in torch's hub checkpoint folder
(``$TORCH_HOME/hub/checkpoints``, i.e. ``torch.hub.get_dir()/checkpoints``) or taken from an explicit
``weights_path``; when absent, :class:`MissingWeightsError` says which file to put where. torch is imported
only by the functions that need it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

# torchvision backbone files used by lpips, and pytorch-fid's Inception weights.
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                        "squeeze": "squeezenet1_1-b8a52dc0.pth"}
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights an image metric needs are not on this machine (nothing is downloaded)."""


# ---------------------------------------------------------------------------------------------------------
# Detection and grading.
# ---------------------------------------------------------------------------------------------------------


def _binary_inputs(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y_true.shape != scores.shape:
        raise ValueError(f"{y_true.size} labels but {scores.size} scores")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, found {np.unique(y_true)[:10].tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores contain {int((~np.isfinite(scores)).sum())} NaN/inf values")
    return y_true.astype(np.int64), scores


def detection_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.0) -> dict[str, Any]:
    """Binary detection metrics from continuous scores (e.g. signed distances); predicted positive = score > threshold.

    AUC is computed from the scores themselves, not the thresholded predictions. A rate with an empty
    denominator (AUC with one class, sensitivity without positives, ...) is NaN and ``note`` says why.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    y_true, scores = _binary_inputs(y_true, scores)
    y_pred = (scores > threshold).astype(np.int64)
    n_pos, n_neg = int(y_true.sum()), int(y_true.size - y_true.sum())
    true_pos = int(((y_pred == 1) & (y_true == 1)).sum())
    true_neg = int(((y_pred == 0) & (y_true == 0)).sum())
    notes = []
    if n_pos and n_neg:
        auc = float(roc_auc_score(y_true, scores))
    else:
        auc = float("nan")
        notes.append(f"AUC undefined: only one class present ({n_pos} positive / {n_neg} negative)")
    if y_true.size == 0:
        notes.append("no samples")
    return {
        "auc": auc,
        "f1": float(f1_score(y_true, y_pred, zero_division=0)) if y_true.size else float("nan"),
        "accuracy": float((y_pred == y_true).mean()) if y_true.size else float("nan"),
        "sensitivity": true_pos / n_pos if n_pos else float("nan"),
        "specificity": true_neg / n_neg if n_neg else float("nan"),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "note": "; ".join(notes),
    }


def roc_curve_points(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds) of the ROC curve; empty arrays with one class."""
    from sklearn.metrics import roc_curve

    y_true, scores = _binary_inputs(y_true, scores)
    if y_true.size == 0 or y_true.min() == y_true.max():
        empty = np.zeros(0)
        return empty, empty.copy(), empty.copy()
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    return fpr, tpr, thresholds


def grading_metrics(y_true_grades: np.ndarray, y_pred_grades: np.ndarray,
                    grade_range: tuple[int, int]) -> dict[str, Any]:
    """Macro-F1 (over the grades that occur in truth or prediction), MAE, accuracy and the confusion matrix.

    ``confusion[i][j]`` counts true grade ``labels[i]`` predicted as ``labels[j]``; labels span the full range.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    y_true = np.asarray(y_true_grades).reshape(-1)
    y_pred = np.asarray(y_pred_grades).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} true grades but {y_pred.size} predicted grades")
    labels = list(range(int(grade_range[0]), int(grade_range[1]) + 1))
    for name, values in (("true", y_true), ("predicted", y_pred)):
        outside = values[~np.isin(values, labels)]
        if outside.size:
            raise ValueError(f"{outside.size} {name} grades lie outside {labels} (e.g. {outside[:5].tolist()})")
    y_true, y_pred = y_true.astype(np.int64), y_pred.astype(np.int64)
    if y_true.size == 0:
        return {"macro_f1": float("nan"), "mae": float("nan"), "accuracy": float("nan"),
                "confusion": [[0] * len(labels) for _ in labels], "labels": labels}
    occurring = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    return {
        "macro_f1": float(f1_score(y_true, y_pred, labels=occurring, average="macro", zero_division=0)),
        "mae": float(np.abs(y_true - y_pred).mean()),
        "accuracy": float((y_true == y_pred).mean()),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": labels,
    }


# ---------------------------------------------------------------------------------------------------------
# Counterfactual metrics.
# ---------------------------------------------------------------------------------------------------------


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    return torch is not None and isinstance(x, torch.Tensor)


def l1_proximity(a: Any, b: Any) -> Any:
    """Mean absolute difference per sample: (B, ...) x (B, ...) -> (B,); torch in -> torch out, numpy -> numpy."""
    if a.shape != b.shape:
        raise ValueError(f"l1_proximity needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if _is_tensor(a) or _is_tensor(b):
        return (a - b).abs().flatten(1).mean(dim=1)
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return diff.reshape(diff.shape[0], -1).mean(axis=1)


def validity_rate(pred: np.ndarray, target: np.ndarray | float) -> float:
    """Fraction of counterfactuals whose predicted class/grade equals the target (a scalar target broadcasts)."""
    pred = np.asarray(pred.detach().cpu() if _is_tensor(pred) else pred).reshape(-1)
    target = np.asarray(target.detach().cpu() if _is_tensor(target) else target)
    if pred.size == 0:
        raise ValueError("validity_rate of an empty batch is undefined")
    target = np.broadcast_to(target.reshape(-1) if target.ndim else target, pred.shape)
    return float((pred == target).mean())


# ---------------------------------------------------------------------------------------------------------
# Pretrained image metrics (weights never downloaded).
# ---------------------------------------------------------------------------------------------------------


def hub_checkpoint_dir() -> Path:
    """Where torch (and so lpips / pytorch-fid) looks for cached weights: ``torch.hub.get_dir()/checkpoints``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _require_weights(filename: str, weights_path: str | os.PathLike | None, what: str) -> Path:
    """The weights file to use, or MissingWeightsError naming the file and where to put it."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise MissingWeightsError(f"{what}: weights_path {path} does not exist")
        return path
    path = hub_checkpoint_dir() / filename
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} needs the pretrained weights file {filename!r}, which is not in {path.parent}; nothing is "
            f"downloaded here, so copy {filename} into {path.parent} (torch.hub.get_dir()/checkpoints, set by "
            "$TORCH_HOME) or pass weights_path=")
    return path


def _as_rgb(images: Any) -> Any:
    """(B, 1 or 3, H, W) -> (B, 3, H, W) float; grayscale is repeated over the three channels."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    images = images.float()
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class LPIPSMetric:
    """Learned perceptual distance (lpips package), ``metric(a, b) -> (B,)`` for images in [-1, 1].

    The torchvision backbone comes from the hub checkpoint folder or ``weights_path``; the small linear layers
    ship inside the lpips package. ``pretrained_backbone=False`` uses a random backbone (tests only).
    """

    def __init__(self, net: str = "alex", weights_path: str | os.PathLike | None = None,
                 pretrained_backbone: bool = True, device: str = "cpu") -> None:
        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
        # Find the weights BEFORE lpips builds torchvision's network, which would otherwise try to download.
        path = _require_weights(LPIPS_BACKBONE_FILES[net], weights_path, f"LPIPS ({net})") \
            if pretrained_backbone else None
        import warnings

        import lpips
        import torch

        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            # the hub file (no explicit path) is found by torchvision's cache lookup, without a download
            from_hub = pretrained_backbone and weights_path is None
            self.model = lpips.LPIPS(net=net, pnet_rand=not from_hub, verbose=False)
        if pretrained_backbone and weights_path is not None:
            self._load_backbone(torch.load(path, map_location="cpu", weights_only=True))
        self.model = self.model.eval().to(device)
        self.device = device

    def _load_backbone(self, state_dict: dict[str, Any]) -> None:
        """Copy torchvision ``features.<i>.*`` weights into lpips's slices, which keep the layer index ``<i>``."""
        import torch

        loaded = 0
        for slice_module in self.model.net.children():
            for index, layer in slice_module.named_children():
                for name, param in layer.named_parameters():
                    key = f"features.{index}.{name}"
                    if key not in state_dict:
                        raise ValueError(f"backbone weights lack {key!r}: not a torchvision "
                                         f"{self.model.pnet_type} file")
                    with torch.no_grad():
                        param.copy_(state_dict[key])
                    loaded += 1
        if loaded == 0:
            raise ValueError("no backbone parameters were loaded")

    def __call__(self, a: Any, b: Any) -> Any:
        """(B, C, H, W) x (B, C, H, W) in [-1, 1] -> (B,) distances; 0 for identical images."""
        import torch

        if a.shape != b.shape:
            raise ValueError(f"LPIPS needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        with torch.no_grad():
            out = self.model(_as_rgb(a.to(self.device)), _as_rgb(b.to(self.device)))  # (B, 1, 1, 1)
        return out.reshape(-1)


class FIDMetric:
    """Frechet Inception Distance with pytorch-fid's Inception network; accumulate with ``update``.

    Images are (B, 1 or 3, H, W) in [-1, 1]; grayscale is repeated to three channels and every image is resized
    to ``image_size`` (299, the network's native size). ``dims`` picks pytorch-fid's feature block
    (64, 192, 768 or 2048, the standard). ``allow_random_weights=True`` builds the network with random weights,
    only for testing the arithmetic.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None, dims: int = 2048, image_size: int = 299,
                 device: str = "cpu", allow_random_weights: bool = False) -> None:
        path = None if allow_random_weights else _require_weights(FID_INCEPTION_FILE, weights_path, "FID")
        from unittest import mock

        import torch
        from pytorch_fid import inception

        if dims not in inception.InceptionV3.BLOCK_INDEX_BY_DIM:
            raise ValueError(f"dims must be one of {sorted(inception.InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
        network = _fid_inception_network(inception)
        if path is not None:
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # InceptionV3 assembles its feature blocks from fid_inception_v3(); hand it the network built above so
        # that nothing is fetched from the internet.
        with mock.patch.object(inception, "fid_inception_v3", lambda: network):
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=False,
                                          normalize_input=False)
        self.model = model.eval().to(device)
        self.device, self.image_size, self.dims = device, image_size, dims
        self._features: dict[bool, list[np.ndarray]] = {True: [], False: []}

    def features(self, images: Any) -> np.ndarray:
        """(B, C, H, W) in [-1, 1] -> (B, dims) pooled Inception features."""
        import torch
        import torch.nn.functional as F

        x = _as_rgb(images.to(self.device))  # (B, 3, H, W)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            out = self.model(x.clamp(-1, 1))[0]  # (B, dims, h, w)
        return F.adaptive_avg_pool2d(out, 1).flatten(1).double().cpu().numpy()

    def update(self, images: Any, real: bool) -> None:
        self._features[bool(real)].append(self.features(images))

    def reset(self) -> None:
        self._features = {True: [], False: []}

    def compute(self) -> float:
        stats = []
        for real in (True, False):
            if sum(len(f) for f in self._features[real]) < 2:
                raise ValueError(f"FID needs at least 2 {'real' if real else 'generated'} images")
            feats = np.concatenate(self._features[real])  # (N, dims)
            stats.append((feats.mean(axis=0), np.cov(feats, rowvar=False)))
        (mu1, sigma1), (mu2, sigma2) = stats
        return frechet_distance(mu1, sigma1, mu2, sigma2)


def _fid_inception_network(inception: Any) -> Any:
    """pytorch-fid's FID variant of Inception v3, built with random weights (the patched blocks of its paper port)."""
    network = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    patched_blocks = {
        "Mixed_5b": (inception.FIDInceptionA, 192, 32), "Mixed_5c": (inception.FIDInceptionA, 256, 64),
        "Mixed_5d": (inception.FIDInceptionA, 288, 64), "Mixed_6b": (inception.FIDInceptionC, 768, 128),
        "Mixed_6c": (inception.FIDInceptionC, 768, 160), "Mixed_6d": (inception.FIDInceptionC, 768, 160),
        "Mixed_6e": (inception.FIDInceptionC, 768, 192),
        "Mixed_7b": (inception.FIDInceptionE_1, 1280), "Mixed_7c": (inception.FIDInceptionE_2, 2048),
    }
    for name, (block, *args) in patched_blocks.items():
        setattr(network, name, block(*args))
    return network


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) equals the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), which is computed with symmetric eigendecompositions (stable for singular S).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    eigvals, eigvecs = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T  # S1^(1/2)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # rounding can leave a tiny negative value for identical statistics


def available_image_metrics() -> dict[str, str]:
    """Which pretrained image metrics can run here: metric name -> "available: <path>" or "missing: <what to do>"."""
    folder = hub_checkpoint_dir()
    files = {f"lpips-{net}": name for net, name in LPIPS_BACKBONE_FILES.items()}
    files["fid"] = FID_INCEPTION_FILE
    return {metric: f"available: {folder / name}" if (folder / name).is_file() else f"missing: put {name} in {folder}"
            for metric, name in files.items()}


# ---------------------------------------------------------------------------------------------------------
# Intervals.
# ---------------------------------------------------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def _median_last_axis(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(values, axis=axis)


def _mean_last_axis(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


def bootstrap_interval(*samples: Any, statistic: Any = "mean", level: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over images: (low, high) at ``level``.

    ``samples`` are per-image arrays of equal length (N,); with several, they are resampled *paired* (the same
    images drawn for each), so ``statistic(a, b, axis=-1)`` can compare two measures of one image set, e.g. the
    median CE error minus the median input error. ``statistic`` is ``"mean"``, ``"median"`` or a vectorised
    callable taking the arrays and ``axis``. A fixed ``seed`` makes the interval reproducible; fewer than two
    finite images give (NaN, NaN). scipy's bootstrap does the resampling.
    """
    from scipy.stats import bootstrap

    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in samples]
    if not arrays or len({a.size for a in arrays}) != 1:
        raise ValueError(f"bootstrap_interval needs samples of one length, got {[a.size for a in arrays]}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: must lie in (0, 1)")
    finite = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    arrays = [a[finite] for a in arrays]
    if arrays[0].size < 2:
        return float("nan"), float("nan")
    named = {"mean": _mean_last_axis, "median": _median_last_axis}
    function = named[statistic] if isinstance(statistic, str) else statistic
    if np.all([np.ptp(a) == 0 for a in arrays]):  # every resample gives the same value
        value = float(function(*arrays, axis=-1))
        return value, value
    result = bootstrap(tuple(arrays), function, n_resamples=resamples, confidence_level=level,
                       method="percentile", paired=len(arrays) > 1, vectorized=True,
                       random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def median_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """median(a) - median(b) along ``axis``: the paired statistic of "closer than the input" (a = CE error,
    b = input error; below 0 the CEs are closer to the truth)."""
    return np.median(a, axis=axis) - np.median(b, axis=axis)


def interval_below(interval: tuple[float, float], bound: float) -> bool:
    """A claim "below ``bound``" holds only when the whole interval lies below it (NaN: never)."""
    return bool(np.isfinite(interval[1]) and interval[1] < bound)


def interval_above(interval: tuple[float, float], bound: float) -> bool:
    """A claim "above ``bound``" holds only when the whole interval lies above it (NaN: never)."""
    return bool(np.isfinite(interval[0]) and interval[0] > bound)

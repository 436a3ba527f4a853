"""The synthetic cohort behind the chest X-ray phantoms: patients, studies, images, finding grades and labels.

Everything is drawn from one seed, patient by patient (``default_rng([seed, patient_index])``), so a corpus of
N images is a prefix-stable function of ``(seed, N)`` and any patient can be re-drawn alone.

Correlations come from two latent states: a patient may have heart failure (a chronically enlarged heart; in a
decompensated study also edema and bilateral effusions), and a study may be an intensive-care one (portable AP
view, support devices, more pneumothorax and consolidation). Labels follow the CheXpert conventions of the
MIMIC-CXR tables: 1 positive, 0 negative (only when the report would mention it), -1 uncertain, blank not
mentioned. Rendered findings take their label from the true grade, with uncertainty most often at grade 1;
the other columns are derived (Lung Opacity, Enlarged Cardiomediastinum, Pneumonia, No Finding) or drawn at
MIMIC-like prevalences without being drawn into the image (Atelectasis, Fracture, Lung Lesion, Pleural Other).
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np

from harness.data.cxr_render import CTR_BY_GRADE, FINDINGS, LOBES
from harness.data.prepare.mimic_cxr import CHEXPERT_COLUMNS

RENDERED_COLUMNS = {"cardiomegaly": "Cardiomegaly", "effusion": "Pleural Effusion", "consolidation": "Consolidation",
                    "pneumothorax": "Pneumothorax", "edema": "Edema", "support_devices": "Support Devices"}
UNRENDERED_PREVALENCE = {"Atelectasis": 0.18, "Fracture": 0.02, "Lung Lesion": 0.03, "Pleural Other": 0.01}
IMAGES_PER_PATIENT = 2.5  # about 166k images from 65k patients, as in MIMIC-CXR-JPG's frontal corpus
UNCERTAIN_RATE = {0: 0.02, 1: 0.35, 2: 0.08, 3: 0.03}  # P(label -1 | true grade) for rendered findings
MENTIONED_NEGATIVE = 0.35  # P(an absent rendered finding is written as 0 rather than left blank)
FIRST_SUBJECT, FIRST_STUDY = 10_000_000, 50_000_000


def _grade(rng: np.random.Generator, weights: tuple[float, float, float]) -> int:
    return int(rng.choice((1, 2, 3), p=np.asarray(weights) / sum(weights)))


def _patient(rng: np.random.Generator) -> dict[str, Any]:
    """Anatomy shared by every study of one patient."""
    heart_failure = rng.random() < 0.22
    return {
        "heart_failure": heart_failure,
        "ctr_grade": int(rng.choice(4, p=[0.15, 0.35, 0.35, 0.15])) if heart_failure else
        int(rng.choice(4, p=[0.88, 0.09, 0.03, 0.0])),
        "thorax_half_width": rng.uniform(0.66, 0.80), "chest_wall": rng.uniform(0.05, 0.08),
        "mediastinum_half_width": rng.uniform(0.08, 0.12), "apex_level": rng.uniform(-0.82, -0.72),
        "diaphragm_level": rng.uniform(0.42, 0.58), "dome_height": rng.uniform(0.10, 0.17),
        "right_dome_lift": rng.uniform(0.02, 0.06), "neck_half_width": rng.uniform(0.16, 0.22),
        "heart_shift": rng.uniform(-0.03, 0.03), "rib_spacing": rng.uniform(0.085, 0.105),
        "clavicle_tilt": rng.uniform(-0.04, 0.04), "soft_tissue": rng.uniform(0.55, 0.68),
        "lung_air": rng.uniform(0.36, 0.46), "bone": rng.uniform(0.10, 0.16), "gastric_bubble": rng.uniform(0, 1),
        "texture_seed": int(rng.integers(2**31)),
    }


def _study_findings(rng: np.random.Generator, patient: dict[str, Any], icu: bool) -> dict[str, Any]:
    decompensated = patient["heart_failure"] and rng.random() < 0.5
    grades = {"cardiomegaly": patient["ctr_grade"]}
    grades["edema"] = _grade(rng, (0.4, 0.35, 0.25)) if decompensated else (_grade(rng, (0.8, 0.2, 0.0))
                                                                            if rng.random() < 0.04 else 0)
    effusion_p = 0.7 if decompensated else (0.18 if icu else 0.08)
    grades["effusion"] = _grade(rng, (0.45, 0.35, 0.2)) if rng.random() < effusion_p else 0
    grades["consolidation"] = _grade(rng, (0.4, 0.35, 0.25)) if rng.random() < (0.14 if icu else 0.05) else 0
    grades["pneumothorax"] = _grade(rng, (0.5, 0.3, 0.2)) if rng.random() < (0.07 if icu else 0.02) else 0
    grades["support_devices"] = _grade(rng, (0.3, 0.35, 0.35)) if icu and rng.random() < 0.8 else \
        (1 if rng.random() < 0.05 else 0)
    record = {f"{name}_grade": grades[name] for name in FINDINGS}
    record.update({f"{name}_q": round(float(rng.random()), 6) for name in FINDINGS})
    record.update(
        effusion_side=int(0 if decompensated or rng.random() < 0.3 else rng.choice((-1, 1))),
        consolidation_side=int(rng.choice((-1, 1))), consolidation_lobe=str(rng.choice(LOBES)),
        consolidation_offset=round(float(rng.uniform(-0.3, 0.3)), 6), pneumothorax_side=int(rng.choice((-1, 1))),
        device_jitter=round(float(rng.uniform(-1, 1)), 6))
    return record


def _exposure(rng: np.random.Generator, view: str) -> dict[str, Any]:
    portable = view == "AP"
    values = {"gain": rng.uniform(0.95, 1.2), "offset": rng.uniform(0.0, 0.08) + (0.04 if portable else 0.0),
              "gamma": rng.uniform(0.8, 1.25), "heel": rng.uniform(-0.08, 0.08),
              "noise_std": rng.uniform(0.008, 0.025) * (1.5 if portable else 1.0),
              "shift_x": rng.uniform(-0.05, 0.05), "shift_y": rng.uniform(-0.02, 0.08),
              "zoom": rng.uniform(1.0, 1.12), "rotation_deg": rng.uniform(-4, 4) * (1.6 if portable else 1.0),
              "device_brightness": rng.uniform(0.25, 0.4)}
    return {k: round(float(x), 6) for k, x in values.items()} | {"noise_seed": int(rng.integers(2**31))}


def _label(rng: np.random.Generator, grade: int) -> float:
    """A CheXpert cell for a finding with true ``grade``: 1, 0, -1 or NaN (blank)."""
    if rng.random() < UNCERTAIN_RATE[grade]:
        return -1.0
    if grade > 0:
        return 1.0
    return 0.0 if rng.random() < MENTIONED_NEGATIVE else float("nan")


def _study_labels(rng: np.random.Generator, findings: dict[str, Any]) -> dict[str, float]:
    labels = {column: _label(rng, findings[f"{name}_grade"]) for name, column in RENDERED_COLUMNS.items()}
    for column, prevalence in UNRENDERED_PREVALENCE.items():
        draw = rng.random()
        labels[column] = 1.0 if draw < prevalence else (-1.0 if draw < prevalence * 1.3 else
                                                       (0.0 if draw > 0.97 else float("nan")))
    opacity = findings["consolidation_grade"] > 0 or findings["edema_grade"] >= 2
    labels["Lung Opacity"] = (1.0 if rng.random() > 0.15 else -1.0) if opacity else \
        (0.0 if rng.random() < 0.1 else float("nan"))
    enlarged = findings["cardiomegaly_grade"] >= 2
    labels["Enlarged Cardiomediastinum"] = (1.0 if rng.random() < 0.4 else -1.0) if enlarged else float("nan")
    infective = findings["consolidation_grade"] > 0 and rng.random() < 0.6  # a consolidation read as pneumonia
    labels["Pneumonia"] = (1.0 if rng.random() < 0.55 else -1.0) if infective else \
        (0.0 if rng.random() < 0.15 else float("nan"))
    pathologic = [c for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices")]
    no_finding = all(np.isnan(labels[c]) or labels[c] == 0 for c in pathologic)
    labels["No Finding"] = 1.0 if no_finding else float("nan")
    return {column: labels[column] for column in CHEXPERT_COLUMNS}


def draw_patient(seed: int, index: int, size: int) -> list[dict[str, Any]]:
    """All images of patient ``index``: one record per image with ids, tables' fields and render parameters."""
    rng = np.random.default_rng([seed, index])
    patient = _patient(rng)
    subject_id = FIRST_SUBJECT + index * 137  # spread over the p10..p19 folders, as in MIMIC-CXR
    studies = 1 + int(rng.poisson(1.0))
    day = datetime.date(2110, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365 * 70)))
    images = []
    for number in range(studies):
        study_id = FIRST_STUDY + index * 16 + number  # unique while a patient has < 16 studies
        icu = rng.random() < 0.35
        view = "AP" if icu or rng.random() < 0.3 else "PA"
        findings = _study_findings(rng, patient, icu)
        labels = _study_labels(rng, findings)
        views = [view] + (["LATERAL"] if view == "PA" and rng.random() < 0.5 else [])
        day += datetime.timedelta(days=int(rng.integers(1, 400)))
        clock = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}.000"
        for image_view in views:
            dicom_id = "".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, 5, dtype=np.uint64))
            dicom_id = "-".join(dicom_id[i:i + 8] for i in range(0, 40, 8))
            anatomy = {k: (round(float(x), 6) if isinstance(x, float) else x) for k, x in patient.items()
                       if k not in ("heart_failure", "ctr_grade")}
            images.append({"dicom_id": dicom_id, "subject_id": subject_id, "study_id": study_id,
                           "view": image_view, "size": size, "StudyDate": day.strftime("%Y%m%d"),
                           "StudyTime": clock, "labels": labels, "heart_failure": patient["heart_failure"],
                           "icu": icu, **anatomy, **findings, **_exposure(rng, image_view)})
    return images


def ctr_of(record: dict[str, Any]) -> float:
    """The true cardiothoracic ratio of a record."""
    low, high = CTR_BY_GRADE[int(record["cardiomegaly_grade"])]
    return low + (high - low) * float(record["cardiomegaly_q"])

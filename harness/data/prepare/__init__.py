"""Dataset preparers: native medical data on disk -> WebDataset shards, labels and splits for training.

One command per source (``python -m harness.data.prepare SOURCE ...``, see ``--help``), or one function:

=============  =========================================================  =====================================
source         input                                                      labels
=============  =========================================================  =====================================
medmnist       a MedMNIST .npz (PneumoniaMNIST, RetinaMNIST, ...)          pneumonia 0/1, grade 0-4, ...
verse          CT NIfTI + centroid JSON + Genant grade table               fracture, grade; level as metadata
spider         T2 MRI .mha + masks + radiological_gradings.csv             pfirrmann 1-5
brats          FLAIR NIfTI + segmentation                                  edema 0/1 per slice
mimic-cxr      MIMIC-CXR-JPG files + metadata/label/split(/severity) CSVs  four findings, edema_severity
images         PNG/JPG/TIFF folder + label table                           the table's columns
dicom, nifti   DICOM files/series or NIfTI volumes + label table           the table's columns
=============  =========================================================  =====================================

Every run writes ``{split}-{index:06d}.tar`` shards and ``manifest.json`` (counts per split and label, pixel
statistics, checksums, skipped inputs with reasons), uses worker processes, and resumes an interrupted run.
NIfTI, MHA and DICOM need the ``prepare`` extra (nibabel, SimpleITK, pydicom; openpyxl for .xlsx tables).
"""

from harness.data.prepare.brats import brats_plan, prepare_brats
from harness.data.prepare.common import (
    BadInput,
    Plan,
    PrepareError,
    PrepareResult,
    RunOptions,
    Skip,
    WorkItem,
    assign_patient_splits,
    split_items_by_patient,
)
from harness.data.prepare.generic import prepare_table_source, table_plan
from harness.data.prepare.imaging import SliceRule
from harness.data.prepare.medmnist import MEDMNIST_DATASETS, medmnist_plan, prepare_medmnist
from harness.data.prepare.mimic_cxr import mimic_plan, prepare_mimic_cxr
from harness.data.prepare.runner import run_plan
from harness.data.prepare.spider import prepare_spider, spider_plan
from harness.data.prepare.verse import prepare_verse, verse_plan

__all__ = [
    "MEDMNIST_DATASETS",
    "BadInput",
    "Plan",
    "PrepareError",
    "PrepareResult",
    "RunOptions",
    "Skip",
    "SliceRule",
    "WorkItem",
    "assign_patient_splits",
    "brats_plan",
    "medmnist_plan",
    "mimic_plan",
    "prepare_brats",
    "prepare_medmnist",
    "prepare_mimic_cxr",
    "prepare_spider",
    "prepare_table_source",
    "prepare_verse",
    "run_plan",
    "spider_plan",
    "split_items_by_patient",
    "table_plan",
    "verse_plan",
]

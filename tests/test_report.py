"""Every figure type and a full report built from synthetic data; the HTML must reference only existing files."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.evaluation import figures
from harness.evaluation.report import Report, check_report, format_value, markdown_to_html

CHROMIUM = Path("/usr/bin/chromium")


class LinearCalibration:
    """grade = 0.8 * dist + 1.5, clipped to 0..3 when rounded: all ``save_calibration`` needs."""

    grade_min, grade_max = 0, 3

    def grade_continuous(self, dist: np.ndarray) -> np.ndarray:
        return 0.8 * np.asarray(dist) + 1.5


def synthetic_images(n: int, seed: int = 0) -> torch.Tensor:
    """(N, 1, 16, 16) in [-1, 1]: a bright disc whose radius grows with the index, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    radius = torch.linspace(2, 6, n)[:, None, None]
    disc = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 < radius**2).float()  # (N, 16, 16)
    return (disc * 1.6 - 0.8 + 0.1 * torch.randn(n, 16, 16, generator=generator)).clamp(-1, 1)[:, None]


def build_report(root: Path) -> tuple[Report, dict[str, Path]]:
    """A report holding one figure of every kind, two tables, text, metrics and a not-computed note."""
    rng = np.random.default_rng(0)
    strip = synthetic_images(6)  # (G, 1, 16, 16), grades -1..4
    grades = list(range(-1, 5))
    fig_dir = root / "figures"
    paths = {
        "grid": figures.save_image_grid(synthetic_images(10), fig_dir / "grid.png", nrow=5,
                                        titles=[f"#{i}" for i in range(10)]),
        "rgb_grid": figures.save_image_grid(synthetic_images(3).repeat(1, 3, 1, 1).numpy(), fig_dir / "rgb.png", 3),
        "strip": figures.save_strip(strip, fig_dir / "strip.png", grades, input_image=strip[2]),
        "strips": figures.save_strips([strip, strip.flip(0)], fig_dir / "strips.png", ["case A", "case B"],
                                      grade_labels=grades, inputs=strip[:2]),
        "gif": figures.save_gif(strip, fig_dir / "strip.gif", duration_ms=200),
        "difference": figures.save_difference_map(strip[1], strip[4], fig_dir / "difference.png"),
        "roc": figures.save_roc({"DAE head": (np.array([0, 0.1, 0.4, 1]), np.array([0, 0.6, 0.9, 1]), 0.85),
                                 "DenseNet": (np.array([0, 0.5, 1]), np.array([0, 0.7, 1]), 0.6)},
                                fig_dir / "roc.png"),
        "calibration": figures.save_calibration(rng.normal(size=80), rng.integers(0, 4, size=80), LinearCalibration(),
                                                fig_dir / "calibration.png"),
        "confusion": figures.save_confusion(np.array([[30, 3, 0], [4, 20, 2], [0, 5, 11]]), ["0", "1", "2"],
                                            fig_dir / "confusion.png"),
        "latent": figures.save_latent_map(rng.normal(size=(60, 16)),
                                          {"label": rng.integers(0, 2, 60), "age": rng.uniform(20, 80, 60)},
                                          fig_dir / "latent.png", max_points=50),
        "loss": figures.save_loss_curve(np.arange(50), np.exp(-np.arange(50) / 20) + 0.05, fig_dir / "loss.png",
                                        smooth=5),
    }
    report = Report(root, "Synthetic evaluation")
    report.add_text("Summary", "Counterfactuals of a **synthetic** set.\n\n- validity `1.0`\n- proximity low")
    report.add_metrics({"auc": np.float64(0.912345678), "n_test": np.int64(256), "fid": float("nan")})
    report.add_not_computed("LPIPS", "backbone weights are absent")
    report.add_table("classification", [{"task": "fracture", "auc": 0.912345678, "f1": 0.8},
                                        {"task": "grade", "auc": None, "macro_f1": 0.61}],
                     caption="Table 2: classification")
    report.add_table("counterfactuals", [{"target": 3, "validity": 1.0, "l1": 0.0421}], caption="CE quality",
                     section="Counterfactuals")
    for name, path in paths.items():
        report.add_figure(path, caption=f"{name} figure", section="Counterfactuals" if name != "loss" else "Training")
    return report, paths


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_every_figure_type_writes_a_readable_image(tmp_path: Path) -> None:
    _, paths = build_report(tmp_path)
    for name, path in paths.items():
        assert path.is_file(), name
        with Image.open(path) as image:
            image.verify()  # raises on a truncated or corrupt file
        with Image.open(path) as image:
            assert image.width > 50 and image.height > 50, name
    with Image.open(paths["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 6 and gif.width >= 128
    assert not list((tmp_path / "figures").glob(".tmp-*"))  # atomic writes leave no temporaries behind


def test_figure_inputs_are_checked(tmp_path: Path) -> None:
    strip = synthetic_images(3)
    with pytest.raises(ValueError, match="grade labels"):
        figures.save_strip(strip, tmp_path / "s.png", [0, 1])
    with pytest.raises(ValueError, match="differ in size"):
        figures.save_difference_map(strip[0], torch.zeros(1, 8, 8), tmp_path / "d.png")
    with pytest.raises(ValueError, match="colouring"):
        figures.save_latent_map(np.zeros((10, 4)), {"label": np.zeros(9)}, tmp_path / "l.png")
    # an unchanged counterfactual (all-zero difference) still renders
    assert figures.save_difference_map(strip[0], strip[0], tmp_path / "same.png").is_file()


def test_rgb_difference_maps_show_colour_and_a_luminance_difference(tmp_path: Path) -> None:
    x = torch.zeros(3, 8, 8) - 0.5
    ce = x.clone()
    ce[0, 2:4, 2:4] += 1.0  # red up in one corner: luminance rises by 0.299
    ce[2, 5:7, 5:7] -= 1.0  # blue down in another: luminance falls by 0.114
    diff = figures.luminance(ce) - figures.luminance(x)  # (8, 8)
    assert diff[2, 2] == pytest.approx(0.299) and diff[5, 5] == pytest.approx(-0.114) and diff[0, 0] == 0
    np.testing.assert_array_equal(figures.luminance(x[:1]), x[0].numpy())  # one channel: the image itself
    path = figures.save_difference_map(x, ce, tmp_path / "rgb.png")
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).any()  # the panels are in colour, not grey


def test_legends_name_levels_from_the_job_file_and_write_whole_floats_as_integers() -> None:
    assert figures.level_name(np.float64(1.0)) == "1" and figures.level_name(0.5) == "0.5"
    assert figures.level_name(np.float32(1.0), ["normal", "pneumonia"]) == "pneumonia"
    assert figures.level_name(np.int64(2), {2: "moderate"}) == "moderate"
    assert figures.level_name(7, ["a", "b"]) == "7"  # no name given for this level: the level itself


def test_latent_embedding_is_deterministic_and_separates_clusters() -> None:
    rng = np.random.default_rng(1)
    z = np.concatenate([rng.normal(0, 1, (30, 8)), rng.normal(8, 1, (30, 8))])
    first, second = figures.embed_2d(z, seed=0), figures.embed_2d(z, seed=0)
    np.testing.assert_allclose(first, second)
    centre_a, centre_b = first[:30].mean(0), first[30:].mean(0)
    spread = max(first[:30].std(0).max(), first[30:].std(0).max())
    assert np.linalg.norm(centre_a - centre_b) > 2 * spread


def test_report_html_tables_and_links(tmp_path: Path) -> None:
    report, paths = build_report(tmp_path / "report")
    outside = tmp_path / "elsewhere.png"
    shutil.copyfile(paths["roc"], outside)
    copied = report.add_figure(outside, caption="copied in", section="Extra")
    assert copied == tmp_path / "report" / "figures" / "elsewhere.png"
    index = report.write()

    assert index == tmp_path / "report" / "index.html"
    assert check_report(index) == []
    text = index.read_text()
    parser = _Tags()
    parser.feed(text)
    assert sorted(parser.images) == sorted({f"figures/{p.name}" for p in paths.values()} | {"figures/elsewhere.png"})
    assert parser.tags.count("table") == 3  # metrics + two tables
    # sections in order of first use, with the not-computed note before them
    positions = [text.index(s) for s in ("Metrics not computed", "<h2>Metrics", "<h2>Summary", "<h2>Results",
                                         "<h2>Counterfactuals", "<h2>Training", "<h2>Extra")]
    assert positions == sorted(positions)
    assert "0.9123" in text and "0.912345678" not in text  # numbers formatted, not dumped
    assert "<strong>synthetic</strong>" in text and "<li>validity <code>1.0</code></li>" in text

    with open(tmp_path / "report" / "tables" / "classification.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["task"] for r in rows] == ["fracture", "grade"] and rows[1]["macro_f1"] == "0.61"
    assert "| task | auc | f1 | macro_f1 |" in (tmp_path / "report" / "tables" / "classification.md").read_text()
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["metrics"] == {"auc": 0.912345678, "n_test": 256, "fid": None}
    assert results["not_computed"] == {"LPIPS": "backbone weights are absent"}
    assert results["tables"]["counterfactuals"] == [{"target": 3, "validity": 1.0, "l1": 0.0421}]
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "## Counterfactuals" in markdown and "![roc figure](figures/roc.png)" in markdown

    paths["gif"].unlink()
    assert check_report(index) == ["figures/strip.gif"]


def test_report_rejects_bad_input(tmp_path: Path) -> None:
    report = Report(tmp_path, "t")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        report.add_figure(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="plain file name"):
        report.add_table("../escape", [{"a": 1}])
    report.add_table("t1", [{"a": 1}])
    with pytest.raises(ValueError, match="already added"):
        report.add_table("t1", [{"a": 2}])


def test_value_formatting_and_markdown_subset() -> None:
    assert [format_value(v) for v in (3, 2.0, 0.000123456, np.float32(1.5), None, float("inf"), "x")] == \
        ["3", "2", "0.0001235", "1.5", "n/a", "n/a", "x"]
    rendered = markdown_to_html("## Head\n\nplain <b> & text\n\n- one\n- *two*")
    assert "<h4>Head</h4>" in rendered and "&lt;b&gt; &amp;" in rendered and "<li><em>two</em></li>" in rendered


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed: the HTML parse check stands in")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    report, _ = build_report(tmp_path / "report")
    index = report.write()
    screenshot = tmp_path / "screenshot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={screenshot}",
                    "--window-size=1200,1600", f"file://{index.resolve()}"],
                   check=True, timeout=60, capture_output=True)
    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank page


def test_intervals_print_as_pairs_and_the_verdicts_name_rows_whose_claims_fail() -> None:
    from harness.evaluation.evaluate import ce_verdicts, judged_caption
    from harness.evaluation.report import format_value

    assert format_value([0.123456, 0.9]) == "[0.1235, 0.9]" and format_value([None, 1.0]) == "[n/a, 1]"
    rows = [{"direction": "pattern", "move": "1x", "kind": "healthy -> fractured", "closer_than_input_holds": False,
             "oracle_flip_ci": [0.40, 0.62]},
            {"direction": "pattern", "move": "1x", "kind": "fractured -> healthy", "closer_than_input_holds": True,
             "oracle_flip_ci": [0.91, 0.99]}]
    text = ce_verdicts(rows)
    assert "Not closer" in text and "includes 0.5" in text and "fractured -> healthy" not in text
    assert ce_verdicts(rows[1:]) == "Every CE row's claims hold by their intervals."
    assert judged_caption(None) == "No oracle judged these CEs."

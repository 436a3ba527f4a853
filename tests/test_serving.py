"""The served explainer: request decoding, building, and a real `mlflow models serve` on loopback.

One server per module (starting it takes MLflow several seconds). Answers are checked against the same
computation done here directly with ``DiffusionAutoencoder`` and the head, so a wrong image scaling, a
swapped counterfactual or a misapplied calibration shows up as a mismatch.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from helpers.serving import (
    STEPS,
    export_tiny_dae,
    free_port,
    phantom_images,
    png_b64,
    png_pixels,
    start_server,
    stop_server,
    to_model_input,
    wait_until_ready,
    write_heads,
)
from PIL import Image

from harness.cli import run_main
from harness.config import ConfigError
from harness.method.autoencoder import DiffusionAutoencoder
from harness.method.counterfactual import move_to_distance, reflect
from harness.ops import explainer, serving

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one built explainer, one server.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[dict]:
    """Build the explainer with the CLI and start `mlflow models serve` on it right away (it boots meanwhile)."""
    root = tmp_path_factory.mktemp("explainer")
    model_dir = export_tiny_dae(root / "dae" / "final")
    images = phantom_images(4)
    result = write_heads(root / "heads.json", model_dir, images)
    out = serving.main(["build", "--model", str(model_dir), "--heads", str(root / "heads.json"), "--task",
                        "fracture", "--kind", "svm", "--out", str(root / "served"), "--invert-steps", str(STEPS),
                        "--decode-steps", str(STEPS), "--max-images", "8"])
    port = free_port()
    process = start_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(out), "--env-manager",
                            "local", "-h", "127.0.0.1", "-p", str(port)], root / "serve.log")
    try:
        yield {"root": root, "model_dir": model_dir, "images": images, "result": result, "out": out,
               "process": process, "port": port}
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def server(built) -> str:
    wait_until_ready(built["process"], f"http://127.0.0.1:{built['port']}/ping", built["root"] / "serve.log")
    return f"http://127.0.0.1:{built['port']}/invocations"


@pytest.fixture(scope="module")
def reference(built) -> dict:
    """What the server should answer, computed directly."""
    result = built["result"]
    ae = DiffusionAutoencoder.load(built["model_dir"], device="cpu", invert_steps=STEPS, decode_steps=STEPS)
    x = to_model_input(built["images"])  # (4, 1, 32, 32)
    z = ae.encode(x)
    x_T = ae.invert(x, z)
    dist = result.head.decision(z.double().numpy())
    grade_z = {g: move_to_distance(z, result.head.hyperplane, float(result.calibration.distance_for_grade(g)),
                                   result.direction) for g in (0, 3)}
    to_pixels = lambda t: np.rint((t[:, 0].numpy() + 1.0) * 127.5).astype(np.int16)  # noqa: E731
    return {"dist": dist, "probability": result.head.probability(z.double().numpy()),
            "grade": result.calibration.grade(dist),
            "ce_binary": to_pixels(ae.decode(reflect(z, result.head.hyperplane, result.direction), x_T)),
            "ce_binary_along_normal": to_pixels(ae.decode(reflect(z, result.head.hyperplane), x_T)),
            "ce_grade": {g: to_pixels(ae.decode(moved, x_T)) for g, moved in grade_z.items()}}


# ---------------------------------------------------------------------------------------------------------
# Building (first: the server started by the fixture boots while the tests below run).
# ---------------------------------------------------------------------------------------------------------


def test_build_names_unknown_heads_and_mismatched_latents(built, tmp_path):
    heads = built["root"] / "heads.json"
    with pytest.raises(ConfigError, match="fracture/svm"):
        serving.build_explainer(built["model_dir"], heads, "fracture", "logistic", tmp_path / "a")
    small = tmp_path / "heads16.json"
    write_heads(small, built["model_dir"], built["images"], dim=16)
    with pytest.raises(ConfigError, match="z_dim 512"):
        serving.build_explainer(built["model_dir"], small, "fracture", "svm", tmp_path / "b")
    with pytest.raises(FileExistsError):
        serving.build_explainer(built["model_dir"], built["root"] / "heads.json", "fracture", "svm", built["out"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    mlmodel = (built["out"] / "MLmodel").read_text()
    assert "python_model.pkl" not in mlmodel and "code_model" in mlmodel  # nothing pickled
    assert (built["out"] / "artifacts" / "final" / "ema.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------
# Request decoding (no model needed).
# ---------------------------------------------------------------------------------------------------------


def test_png_and_array_inputs_decode_to_the_same_image():
    image = phantom_images(1)[0]
    from_png = explainer.decode_image(png_b64(image), "row 0", 32, 1)
    from_array = explainer.decode_image((image / 255.0).tolist(), "row 0", 32, 1)
    assert from_png.shape == (1, 32, 32) and np.allclose(from_png, from_array, atol=1e-6)
    sixteen = Image.fromarray(image.astype(np.uint16) * 257)  # 16-bit gray scales to the same [0, 1]
    buffer = io.BytesIO()
    sixteen.save(buffer, format="PNG")
    decoded = explainer.decode_image(base64.b64encode(buffer.getvalue()).decode(), "row 0", 32, 1)
    assert np.allclose(decoded, from_png, atol=1e-6)
    rgb = explainer.decode_image(png_b64(np.stack([image] * 3, -1)), "row 0", 32, 3)
    assert rgb.shape == (3, 32, 32)


@pytest.mark.parametrize("value, channels, message", [
    (png_b64(np.zeros((16, 16), np.uint8)), 1, "16x16 pixels, the model takes 32x32"),
    (png_b64(np.zeros((32, 32, 3), np.uint8)), 1, "has 3 channel(s), the model takes 1"),
    (png_b64(np.zeros((32, 32), np.uint8)), 3, "has 1 channel(s), the model takes 3"),
    (png_b64(np.zeros((32, 32, 4), np.uint8)), 1, "has 4 channel(s)"),
    (base64.b64encode(b"plain text, not a picture").decode(), 1, "not an image"),
    ("%%% not base64 %%%", 1, "not valid base64"),
    (17, 1, "base64-encoded PNG string or a nested array"),
    ([[0.5] * 32] * 31, 1, "31x32 pixels"),
    ([[[0.5] * 32] * 32] * 3, 1, "3 channel(s), the model takes 1"),
    ([[2.0] * 32] * 32, 1, "must lie in [0, 1] (found 2..2)"),
    ([[0.5, 0.5], [0.5]], 1, "not a rectangular array"),
])
def test_malformed_images_are_refused_with_the_reason(value, channels, message):
    with pytest.raises(explainer.InvalidRequest, match="row 4") as error:
        explainer.decode_image(value, "row 4", 32, channels)
    assert message in str(error.value)


def test_target_grades_are_checked_against_the_calibration():
    assert explainer.check_grade(2.0, "row 0", (0, 3)) == 2
    for value, message in [(4, "out of range"), (-1, "out of range"), (1.5, "not an integer"), ("2", "number"),
                           (True, "number"), (float("inf"), "not an integer")]:
        with pytest.raises(explainer.InvalidRequest, match=message):
            explainer.check_grade(value, "row 0", (0, 3))
    with pytest.raises(explainer.InvalidRequest, match="no grade calibration"):
        explainer.check_grade(1, "row 0", None)
    with pytest.raises(explainer.InvalidRequest, match="input columns"):
        import pandas as pd

        explainer.request_rows(pd.DataFrame({"image": ["x"], "grade": [1]}))


# ---------------------------------------------------------------------------------------------------------
# The real server.
# ---------------------------------------------------------------------------------------------------------


def test_served_answers_match_the_direct_computation(built, server, reference):
    images = built["images"]
    records = [{"image": png_b64(images[0])}, {"image": png_b64(images[1]), "target_grade": 3},
               {"image": (images[2] / 255.0).tolist()}, {"image": png_b64(images[3]), "target_grade": 0}]
    answer = requests.post(server, json={"dataframe_records": records}, timeout=60)
    assert answer.status_code == 200, answer.text
    rows = answer.json()["predictions"]
    assert [row["row"] for row in rows] == [0, 1, 2, 3]
    assert np.allclose([row["distance"] for row in rows], reference["dist"], atol=1e-4)
    assert np.allclose([row["probability"] for row in rows], reference["probability"], atol=1e-4)
    assert [row["predicted_grade"] for row in rows] == reference["grade"].tolist()
    assert len(set(reference["grade"].tolist())) > 1  # the check above compares differing grades
    assert [row["predicted_class"] for row in rows] == (reference["dist"] > 0).astype(int).tolist()
    for i, row in enumerate(rows):
        assert row["ce_binary_class"] == 1 - row["predicted_class"]
        assert np.abs(png_pixels(row["ce_binary_png"]) - reference["ce_binary"][i]).max() <= 2
    assert [row["target_grade"] for row in rows] == [None, 3, None, 0]
    assert rows[0]["ce_grade_png"] is None and rows[2]["ce_grade_png"] is None
    assert np.abs(png_pixels(rows[1]["ce_grade_png"]) - reference["ce_grade"][3][1]).max() <= 2
    assert np.abs(png_pixels(rows[3]["ce_grade_png"]) - reference["ce_grade"][0][3]).max() <= 2
    assert np.abs(reference["ce_grade"][3][1] - reference["ce_grade"][0][1]).max() > 2  # grades look different
    # the stored direction matters: moving along the normal instead would have given other images
    assert np.abs(reference["ce_binary"] - reference["ce_binary_along_normal"]).max() > 2

    # A request-wide target grade from params; binary counterfactuals switched off.
    answer = requests.post(server, json={"dataframe_split": {"columns": ["image"], "data": [[png_b64(images[1])]]},
                                         "params": {"target_grade": 0, "binary": False}}, timeout=60)
    assert answer.status_code == 200, answer.text
    (row,) = answer.json()["predictions"]
    assert row["ce_binary_png"] is None and row["target_grade"] == 0
    assert np.abs(png_pixels(row["ce_grade_png"]) - reference["ce_grade"][0][1]).max() <= 2

    # Prediction only: no counterfactual asked for, none returned.
    answer = requests.post(server, json={"dataframe_records": [{"image": png_b64(images[1])}],
                                         "params": {"binary": False}}, timeout=60)
    (row,) = answer.json()["predictions"]
    assert row["ce_binary_png"] is None and row["ce_grade_png"] is None
    assert row["distance"] == pytest.approx(reference["dist"][1], abs=1e-4)


def test_malformed_requests_get_400_and_the_server_keeps_serving(built, server):
    image = built["images"][0]
    good = {"dataframe_records": [{"image": png_b64(image)}]}
    bad_requests = [
        ({"dataframe_records": [{"image": png_b64(image[:20, :20])}]}, "20x20 pixels, the model takes 32x32"),
        ({"dataframe_records": [{"image": png_b64(np.stack([image] * 3, -1))}]}, "the model takes 1"),
        ({"dataframe_records": [{"image": base64.b64encode(b"GIF? no.").decode()}]}, "not an image"),
        ({"dataframe_records": [{"image": "!!"}]}, "not valid base64"),
        ({"dataframe_records": [{"image": png_b64(image), "target_grade": 7}]}, "out of range"),
        ({"dataframe_records": [{"image": png_b64(image)}], "params": {"target_grade": -2}}, "out of range"),
        ({"dataframe_records": [{"image": png_b64(image), "target_grade": 1.5}]}, "not an integer"),
        ({"dataframe_records": [{"image": [[0.5] * 32] * 30}]}, "30x32 pixels"),
        ({"dataframe_records": [{"image": png_b64(image)}] * 9}, "at most 8"),
        ({"dataframe_records": [{"image": png_b64(image)}, {"image": "??"}]}, "row 1"),
        ({"dataframe_records": [{"picture": png_b64(image)}]}, "image"),
    ]
    for body, message in bad_requests:
        answer = requests.post(server, json=body, timeout=60)
        assert answer.status_code == 400, (message, answer.status_code, answer.text[:300])
        error = answer.json()
        assert error["error_code"] == "INVALID_PARAMETER_VALUE" and message in error["message"], error["message"][-300:]
        assert requests.post(server, json=good, timeout=60).status_code == 200  # still serving
    not_json = requests.post(server, data=b"\x89PNG...", headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= not_json.status_code < 500


def test_concurrent_requests_all_succeed(built, server):
    """4 threads x 5 requests on loopback: every answer 200 and identical for the same image."""
    body = {"dataframe_records": [{"image": png_b64(built["images"][2])}]}

    def send(_: int) -> tuple[int, float]:
        answer = requests.post(server, json=body, timeout=120)
        return answer.status_code, answer.json()["predictions"][0]["distance"] if answer.ok else float("nan")

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(send, range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert np.ptp([distance for _, distance in results]) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# Issue 26, items 7, 9 and 10: mistakes refused when the explainer is built, MLflow's input forms, no echo.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"--task": "spine"}, "has no head 'spine/svm'; available: ['fracture/svm']"),
    ({"--kind": "forest"}, "has no head 'fracture/forest'"),
    ({"heads": "not json {"}, "not a JSON file"),
    ({"heads": "[1, 2]"}, "expected an object of \"task/kind\" heads, got a JSON list"),
    ({"heads": '{"fracture/svm": {"task": {"name": "fracture"}}}'}, "entry 'fracture/svm' is not a fitted head"),
    ({"--invert-steps": "-1"}, "--invert-steps -1: the number of DDIM inversion steps must be a positive integer"),
    ({"--invert-steps": "0"}, "--invert-steps 0: the number of DDIM inversion steps must be a positive integer"),
    ({"--decode-steps": "0"}, "--decode-steps 0"),
    ({"--max-images": "0"}, "--max-images 0: must be a positive integer"),
])
def test_a_bad_build_setting_is_one_error_line_and_exit_2_before_anything_is_built(built, tmp_path, capsys, change,
                                                                                   message):
    heads = built["root"] / "heads.json"
    if "heads" in change:
        heads = tmp_path / "heads.json"
        heads.write_text(change.pop("heads"))
    options = {"--model": str(built["model_dir"]), "--heads": str(heads), "--task": "fracture", "--kind": "svm",
               "--out": str(tmp_path / "served"), **change}
    status = run_main(serving.main, ["build", *(item for pair in options.items() for item in pair)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "served").exists()


@pytest.mark.parametrize("value, name", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_a_non_finite_pixel_is_named_with_its_place(value, name):
    image = np.full((32, 32), 0.5)
    image[3, 5] = value
    image[7, 1] = value
    with pytest.raises(explainer.InvalidRequest) as error:
        explainer.decode_image(image.tolist(), "row 2", 32, 1)
    assert f"row 2: image array values must be finite: found {name} at channel 0, pixel row 3, column 5 " \
           "(2 non-finite value(s))" in str(error.value)


def test_mlflows_inputs_forms_are_answered_like_records(built, server, reference):
    images = built["images"]
    pngs = [png_b64(image) for image in images[:2]]
    forms = [{"inputs": {"image": pngs}}, {"inputs": pngs},
             {"inputs": {"image": [(image / 255.0).tolist() for image in images[:2]]}},
             {"instances": [{"image": png} for png in pngs]}]
    for body in forms:
        answer = requests.post(server, json=body, timeout=60)
        assert answer.status_code == 200, (body.keys(), answer.text[:300])
        rows = answer.json()["predictions"]
        assert np.allclose([row["distance"] for row in rows], reference["dist"][:2], atol=1e-4)
        for i, row in enumerate(rows):
            assert np.abs(png_pixels(row["ce_binary_png"]) - reference["ce_binary"][i]).max() <= 2
    answer = requests.post(server, json={"inputs": {"image": pngs[1:], "target_grade": [3]}}, timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    (row,) = answer.json()["predictions"]
    assert row["target_grade"] == 3 and np.abs(png_pixels(row["ce_grade_png"]) - reference["ce_grade"][3][1]).max() <= 2


def test_error_bodies_never_echo_the_request(built, server):
    png = png_b64(built["images"][0])
    marker = png[:40]  # what MLflow's own message quoted: the start of the request's image column
    array = np.full((32, 32), 0.123456789)
    bad_requests = [
        {"dataframe_records": [{"image": png, "target_grade": 7}]},
        {"dataframe_records": [{"image": png, "picture": png}]},
        {"dataframe_records": [{"image": png}], "params": {"target_grade": 1.5}},
        {"inputs": {"image": [png], "target_grade": [9]}},
        {"dataframe_records": [{"image": array.tolist(), "target_grade": 8}]},
    ]
    for body in bad_requests:
        answer = requests.post(server, json=body, timeout=60)
        assert answer.status_code == 400, answer.text[:300]
        assert marker not in answer.text and "0.123456" not in answer.text, answer.text[:300]
        error = answer.json()
        assert error["error_code"] == "INVALID_PARAMETER_VALUE" and ("row 0" in error["message"] or
                                                                     "input columns" in error["message"])
        assert not error.get("stack_trace"), error["stack_trace"][-300:]


def test_evaluation_and_the_served_model_make_the_same_counterfactual(built, monkeypatch):
    """One engine: the served model (called in-process with a pandas DataFrame) and evaluation's CE set give the
    same binary counterfactual image for the same inputs."""
    import json

    import mlflow.pyfunc
    import pandas as pd

    from harness.evaluation.evaluate import evaluate_counterfactual_set

    monkeypatch.setenv("DAE_CF_SERVING_DEVICE", "cpu")
    settings = json.loads((built["out"] / "artifacts" / "serving.json").read_text())
    images = built["images"]
    served = mlflow.pyfunc.load_model(str(built["out"])).predict(
        pd.DataFrame({"image": [png_b64(image) for image in images]}))
    result = built["result"]
    ae = DiffusionAutoencoder.load(built["model_dir"], device="cpu", batch_size=settings["batch_size"],
                                   invert_steps=STEPS, decode_steps=STEPS)
    _, outputs = evaluate_counterfactual_set(
        ae, {"image": to_model_input(images), "meta": [], "labels": {}}, result, invert_steps=STEPS,
        decode_steps=STEPS, directions={result.direction_name: result.direction}, render=settings["render"],
        local_threshold=settings["local_threshold"])
    evaluated = outputs["binary"].x_ce.numpy()  # (4, 1, 32, 32)
    for i, row in enumerate(served):
        assert row["ce_binary_png"] == explainer.encode_png(evaluated[i]), f"image {i} differs"
        assert row["oracle"] == "no oracle packaged" and row["oracle_target_probability"] is None  # none beside
    assert len({row["ce_binary_png"] for row in served}) == len(served)  # four different images were compared


def test_serve_help_prints_usage_first_and_no_mlflow_warning():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "harness.command", "serve", "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0 and done.stdout.startswith("usage: dae-cf serve")
    assert done.stderr == "", done.stderr[:300]

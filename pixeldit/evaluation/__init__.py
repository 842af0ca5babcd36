"""Evaluation of trained models: prompt-following checks on the synthetic set (``synthetic_checks``)."""

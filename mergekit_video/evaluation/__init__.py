"""Evaluation: close-set, zero-shot and few-shot accuracy, per-expert and per-merge comparisons."""

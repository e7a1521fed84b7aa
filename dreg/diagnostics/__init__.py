"""Gradient diagnostics at a fixed model: bias checks and variance/SNR versus K.

Modes of ``train.py`` (``mode=bias_check``, ``mode=diagnose``); the trajectory statistics
during training are callbacks in :mod:`dreg.callbacks`. Definitions: docs/diagnostics.md.
"""

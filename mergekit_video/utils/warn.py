"""Warnings attributed to the user's line, not to a frame inside torch or this package."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the first calling frame outside torch and mergekit_video.

    A warning raised in a module's forward would otherwise point into ``torch/nn/modules/module.py``.
    """
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)

"""Frame preprocessing shared by every stage: crop the dashboard, area-resize to 64×64.

It runs on every frame of every stage, so it stays a tight cv2 loop over the batch (about
10 µs a frame) instead of anything that allocates per pixel in Python.
"""

from __future__ import annotations

import cv2
import numpy as np

FRAME_SIZE = 64
CROP_ROWS = 84  # the top 84 of 96 rows: everything above the dashboard (the paper's choice)


def preprocess_frames(frames: np.ndarray, crop: bool = True, size: int = FRAME_SIZE) -> np.ndarray:
    """(N,96,96,3) or (96,96,3) uint8 → (N,size,size,3) or (size,size,3) uint8."""
    single = frames.ndim == 3
    batch = frames[None] if single else frames
    if crop:
        batch = batch[:, :CROP_ROWS]
    out = np.empty((batch.shape[0], size, size, 3), dtype=np.uint8)
    for i, frame in enumerate(batch):
        cv2.resize(frame, (size, size), dst=out[i], interpolation=cv2.INTER_AREA)
    return out[0] if single else out

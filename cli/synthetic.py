"""Data generated in code, shared by the training recipes and the live demo (numpy only, no torch).

The demo streams readings from the same generator the ``sensors`` recipe trained on, so the
served model sees data like its training data; a serving install (no torch) can run it.
"""

from __future__ import annotations

import numpy as np

SENSORS = ("temp", "humidity", "pressure", "vibration", "current", "voltage", "rpm", "flow")
_BASE = np.array([20.0, 55.0, 1013.0, 0.5, 12.0, 230.0, 1500.0, 3.2])
_SCALE = np.array([3.0, 8.0, 5.0, 0.2, 2.0, 4.0, 200.0, 0.5])


def sensor_readings(rng: np.random.Generator, n: int, steps: int) -> np.ndarray:
    """Raw readings [n, steps, 8]: each device mixes two slow oscillations, plus noise."""
    t = np.arange(steps)[None, :, None]
    f1 = rng.uniform(0.02, 0.06, size=(n, 1, 1))
    f2 = rng.uniform(0.08, 0.15, size=(n, 1, 1))
    ph = rng.uniform(0, 2 * np.pi, size=(n, 1, 8))
    mix = rng.uniform(0.3, 1.0, size=(n, 1, 8))
    wave = np.sin(2 * np.pi * f1 * t + ph) + mix * np.sin(2 * np.pi * f2 * t + 2 * ph)
    noise = rng.standard_normal((n, steps, 8)) * 0.05
    return (_BASE + _SCALE * (wave + noise)).astype(np.float32)

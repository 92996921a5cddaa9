"""Write the compose demo's input: synthetic sensor readings as a CSV for `rnnd produce`.

The readings come from the same generator the `sensors` recipe trains on
(``rnnd.synthetic.sensor_readings``), so the served model sees data like its
training data. Rows are interleaved step by step across devices (as live devices would
send them), with columns ``device,control,<the 8 sensors>``; each device's first row carries
``control=reset``, so that replaying the file in a loop restarts every stream cleanly instead
of continuing a stream across the jump from its last reading back to its first.

Needs numpy and rnnd only (no torch), e.g.
``python sensors_csv.py --out /models/demo-sensors.csv --devices 200 --steps 600``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def write_csv(out: Path, devices: int, steps: int, seed: int = 0) -> int:
    """Write the CSV; returns the number of data rows."""
    import numpy as np

    from rnnd.synthetic import SENSORS, sensor_readings

    readings = sensor_readings(np.random.default_rng(seed), devices, steps)  # [devices, steps, 8]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "control", *SENSORS])
        for t in range(steps):
            for d in range(devices):
                w.writerow([f"dev-{d}", "reset" if t == 0 else "", *(f"{v:.4f}" for v in readings[d, t])])
    tmp.replace(out)  # a producer never reads a half-written file
    return devices * steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="CSV file to write")
    p.add_argument("--devices", type=int, default=200, help="streams (default 200)")
    p.add_argument("--steps", type=int, default=600, help="readings per device (default 600)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.devices < 1 or args.steps < 1:
        p.error("--devices and --steps must be >= 1")
    rows = write_csv(args.out, args.devices, args.steps, args.seed)
    print(f"wrote {rows} readings of {args.devices} devices to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

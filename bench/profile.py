"""Hot spots from py-spy's collapsed stacks (``py-spy record --format raw --threads``).

Each line of the file is ``thread (tid);frame;frame;... count``, outermost frame first; a
frame reads ``function (file:line)``. We report, over all samples of all threads:

* **self**: samples whose innermost frame is the function (where the CPU actually was);
* **total**: samples with the function anywhere on the stack (time spent in it and below);
* per thread: the event loop (``MainThread``) against ONNX Runtime's worker (``rnnd-infer``).

py-spy samples the Python stacks of threads that are running (idle threads are left out), so
percentages are of busy time. Native time (ONNX Runtime's kernels, orjson, the socket) is
charged to the Python frame that called it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    samples: int = 0
    by_thread: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)
    total_time: Counter[str] = field(default_factory=Counter)

    def top(self, n: int = 15, kind: str = "self") -> list[tuple[str, float]]:
        c = self.self_time if kind == "self" else self.total_time
        return [(name, 100.0 * k / max(1, self.samples)) for name, k in c.most_common(n)]

    def threads(self) -> list[tuple[str, float]]:
        return [(name, 100.0 * k / max(1, self.samples)) for name, k in self.by_thread.most_common()]

    def as_dict(self, n: int = 20) -> dict:
        return {"samples": self.samples, "threads": self.threads(), "self": self.top(n, "self"),
                "total": self.top(n, "total")}


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    # Keep the package-relative path: site-packages/aiokafka/consumer/fetcher.py → aiokafka/consumer/fetcher.py
    for marker in ("site-packages/", "/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def _thread(frame: str) -> str:
    """``thread (123): MainThread`` → ``MainThread``; ``thread (124): rnnd-infer_0`` → ``rnnd-infer``."""
    m = re.match(r"thread \((?:0x)?[0-9a-fA-F]+\)(?::\s*(?P<name>.*))?$", frame.strip())
    name = (m.group("name") or "unnamed thread") if m else frame.strip()
    return re.sub(r"_\d+$", "", name)


def parse(path: Path) -> Profile:
    prof = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        thread = _thread(frames[0]) if frames and frames[0].startswith("thread (") else ""
        if thread:
            frames = frames[1:]
        prof.samples += k
        prof.by_thread[thread or "?"] += k
        names = [_name(f) for f in frames]
        if names:
            prof.self_time[names[-1]] += k
        for name in set(names):
            prof.total_time[name] += k
    return prof

"""Results on disk as they arrive: one JSON object per line, flushed and fsynced.

``results.jsonl`` holds request and event records; ``logprobs.jsonl`` the prompt
logprobs for fidelity (bulky, so apart). A record with a ``key`` is a finished item:
a rerun skips it. A torn last line (the process was killed mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # only a torn final line can be malformed
    return records


class ResultStore:
    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results = self.dir / "results.jsonl"
        self.logprobs = self.dir / "logprobs.jsonl"
        self.done = {r["key"] for path in (self.results, self.logprobs) for r in read_jsonl(path) if "key" in r}

    def append(self, record: dict, bulky: bool = False) -> None:
        path = self.logprobs if bulky else self.results
        line = json.dumps(record) + "\n"
        with open(path, "a") as f:
            if f.tell() and not self._ends_with_newline(path):
                f.write("\n")  # close a torn line left by a killed run
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if "key" in record:
            self.done.add(record["key"])

    @staticmethod
    def _ends_with_newline(path: Path) -> bool:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

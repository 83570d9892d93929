"""The one resumable data store, used by the benchmark and the experiments.

A data file is a JSON document

    {"meta": {"gpu" ("simulator" there), "mode", "device", "versions", "date", "git_commit",
              "git_dirty", "command", "params", "earlier_runs": [the meta of the runs it
              resumed]},
     <items>: [{... the item's key fields ..., "status": "ok" | "oom" | "unsupported" |
               "skipped" | "error", ...measurements...}, ...],
     ...}

(the benchmark's items are "records", the experiments' "points"). The file is rewritten
atomically (a temporary file, then a rename) after every item, and a rerun skips the items
already there with a final status, so an interrupted run loses nothing it finished. A file
measured on one GPU is never resumed on another: the store refuses (:class:`StaleData`) unless
the run starts afresh.
"""

import datetime
import json
import os
import subprocess
from pathlib import Path

import nbflash
from .._cuda import MODE
from .device import FINAL


class StaleData(RuntimeError):
    """Stored data from another GPU, which a run here must not mix with its own."""


def write_json(path, doc):
    """Write atomically: a temporary file next to `path`, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def load_json(path):
    """The JSON document at `path`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def _git_commit():
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    if head.returncode != 0:
        return "unknown", None
    return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


def run_meta(params, command):
    """A run's meta: where it ran (GPU, mode, device, versions), when, from which commit, the
    command and its parameters."""
    info = nbflash.info()
    commit, dirty = _git_commit()
    return {"gpu": info["gpu"] if MODE == "gpu" else "simulator", "mode": MODE,
            "device": {k: v for k, v in info.items() if k != "versions"},
            "versions": info["versions"],
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": commit, "git_dirty": dirty, "command": command,
            "params": params}


def _hashable(value):
    """A key field as a dictionary key: lists (as JSON gives tuples back) become tuples."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


class Store:
    """A data file of items, each identified by its key: `key` is a function of an item, or a
    tuple of field names. path None keeps the document in memory only. fresh: start afresh
    instead of resuming the file (which is replaced at the first write)."""

    def __init__(self, path, meta, key, items="points", fresh=False):
        self.path = None if path is None else Path(path)
        self.items_name = items
        if callable(key):
            self.key_fields, self.key = None, key
        else:
            self.key_fields = tuple(key)
            self.key = lambda item: tuple(_hashable(item.get(f)) for f in self.key_fields)
        old = None if fresh or self.path is None else load_json(self.path)
        if old is not None:
            if not isinstance(old, dict) or not isinstance(old.get(items), list):
                raise ValueError(f"{self.path} holds no {items!r} list, so it is not this kind "
                                 f"of data file; use another file or start afresh")
            theirs, ours = old.get("meta", {}).get("gpu"), meta.get("gpu")
            if theirs and theirs != ours:
                raise StaleData(f"{self.path} was measured on {theirs}, this is {ours}: measure "
                                f"it afresh here (python -m experiments --fresh, python -m "
                                f"nbflash bench --no-resume) or use another file")
            earlier = old.get("meta", {}).pop("earlier_runs", [])
            meta = {**meta, "earlier_runs": earlier + [old.get("meta", {})]}
        self.doc = {**(old or {}), "meta": meta, items: []}
        self._items = {self.key(item): item for item in (old or {}).get(items, [])}
        self.doc[items] = list(self._items.values())

    def get(self, *key, **fields):
        """The stored item with this key (or these key fields), or None."""
        return self._items.get(self._key_of(key, fields))

    def done(self, *key, **fields):
        """The stored item with this key (or key fields) and a final status, or None."""
        item = self.get(*key, **fields)
        return item if item is not None and item.get("status") in FINAL else None

    def add(self, item):
        """Store `item` (replacing an earlier one with its key, which moves to the end) and
        rewrite the file."""
        key = self.key(item)
        self._items.pop(key, None)
        self._items[key] = item
        self.doc[self.items_name] = list(self._items.values())
        self.write()
        return item

    def write(self):
        if self.path is not None:
            write_json(self.path, self.doc)

    def _key_of(self, key, fields):
        if fields:
            return tuple(_hashable(fields.get(f)) for f in self.key_fields)
        return key[0] if len(key) == 1 else key

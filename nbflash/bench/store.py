"""The one resumable data store, used by the benchmark and the experiments.

A data file is a JSON document

    {"meta": {"gpu" ("simulator" there), "mode", "device", "versions", "date", "git_commit",
              "git_dirty", "command", "params", "earlier_runs": [the meta of the runs it
              resumed], "complete": whether the run finished, "planned" (where the caller
              said): how many items the run means the file to hold when it finishes},
     <items>: [{... the item's key fields ..., "status": "ok" | "oom" | "unsupported" |
               "skipped" | "error", ...measurements...}, ...],
     ...}

(the benchmark's items are "records", the experiments' "points"). The rules:

- **The file only ever holds a finished run.** A run in progress writes its document to the
  side file ``<stem>.partial.json`` next to the file after every item; :meth:`Store.finish`
  (or the end of a ``with Store(...)`` block without an exception) marks it "complete": true
  and renames it onto the file. A run that is interrupted (Ctrl-C, a crash, a lost machine)
  therefore leaves the last complete file exactly as it was, and its own progress in the side
  file.
- **Resuming** (the default): a run continues from the side file when there is one (the
  unfinished run, however it started), else from the file. The items there with a final
  status are kept and skipped, the others measured again; the finished file holds them all, so
  a resumed file is only ever extended (an item is replaced only by a new measurement of the
  same key). A run that changes nothing leaves the file as it was.
- **Starting afresh** (``fresh=True``: ``python -m experiments --fresh``, ``python -m nbflash
  bench --no-resume``): the run keeps none of the stored items, and the file is replaced when
  the run finishes, not before. An unfinished run's side file is first set aside as
  ``<stem>.unfinished-<time>.json``. To continue an interrupted fresh run, rerun without
  --fresh: that resumes its side file.
- **A file that cannot be read** (cut short, not JSON, not this kind of data file) raises
  :class:`CorruptData`, which names it and says what to do; a fresh start sets it aside as
  ``<stem>.corrupt-<time>.json`` and begins again (and a finishing run does the same with a
  file damaged since it started, instead of replacing it). Nothing else is removed: the side
  file goes only by being renamed onto the file, and the only data a run replaces is the
  readable file that a fresh run (the user's --fresh) was asked to measure again.
- A side file records the file as its run found it (meta "based_on", a sha256): resuming it
  after the file has changed (a pull, a copy, another run) is refused (:class:`StaleData`),
  since finishing would put the side file's older data in place of the newer file.
- A file measured on one GPU is never resumed on another: the store refuses
  (:class:`StaleData`) unless the run starts afresh.
- **Completeness**: a document is complete unless its meta says "complete": false, which only
  a side file does (:func:`stored` reads one where no run has finished yet); files written
  before the flag existed count as complete. :func:`progress` gives (items, planned) of an
  incomplete one, for the note its figures and tables carry.
- Every write is atomic: a temporary file from :func:`tempfile.mkstemp` in the same folder
  (its own name in every process), flushed to disk, then ``os.replace``; the temporary file is
  removed when anything fails, and the file it was to replace stays as it was.
"""

import contextlib
import datetime
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import nbflash
from .._cuda import MODE
from .device import FINAL


class StaleData(RuntimeError):
    """Stored data from another GPU, which a run here must not mix with its own."""


class CorruptData(ValueError):
    """A data file that cannot be read as one (cut short, not JSON, not this kind of file). The
    message names it and says what to do; `path` is the file."""

    def __init__(self, path, why):
        self.path, self.why = Path(path), why
        aside = self.path.with_name(f"{self.path.stem}.corrupt-<time>{self.path.suffix}")
        if self.path.stem.endswith(".partial"):   # an unfinished run's side file
            super().__init__(
                f"{self.path} (an unfinished run's progress) cannot be read: {why}. Move it "
                f"away or delete it to resume from the last complete file, or pass --fresh / "
                f"--no-resume to measure everything again")
            return
        super().__init__(
            f"{self.path} cannot be read: {why}. To measure again, pass --fresh (python -m "
            f"experiments, python -m experiments.tuning) or --no-resume (python -m nbflash "
            f"bench): the file is set aside, kept as {aside.name}, and the run starts again; "
            f"or put a good copy back (a committed file: git checkout -- {self.path})")


def _read_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


#: what open(path, "w") gives a new file: 0o666 less the umask (read once, at import: reading
#: it sets it for a moment, which no other thread should see)
_FILE_MODE = 0o666 & ~_read_umask()


def write_json(path, doc):
    """Write atomically: a temporary file of its own (tempfile.mkstemp) next to `path`, flushed
    to disk, then os.replace. When anything fails (an object JSON cannot hold, a full disk,
    Ctrl-C) the temporary file is removed and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_json(path):
    """The JSON document at `path`, or None when there is none; CorruptData (naming the file and
    what to do) when it cannot be read."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise CorruptData(path, f"not text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        why = ("it is empty" if not text.strip() else
               f"not valid JSON, perhaps cut short ({exc.msg}: line {exc.lineno} column "
               f"{exc.colno}, character {exc.pos} of {len(text)})")
        raise CorruptData(path, why) from None


def partial_path(path):
    """The side file of an unfinished run into `path`: <stem>.partial<suffix> next to it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def set_aside(path, tag):
    """Rename `path` to <stem>.<tag>-<time><suffix> next to it (never over another file);
    returns the new path."""
    path = Path(path)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        new = path.with_name(f"{path.stem}.{tag}-{stamp}{f'-{i}' if i else ''}{path.suffix}")
        if not new.exists():
            os.rename(path, new)
            return new
    raise FileExistsError(f"no free name to set {path} aside")


def stored(path):
    """The document a reader of `path` should use: the file (the last finished run), or, while
    no run into it has finished, the unfinished run's side file (its meta says "complete":
    false); None when there is neither."""
    doc = load_json(path)
    return doc if doc is not None else load_json(partial_path(path))


def progress(doc, items=None):
    """None for a complete document (the run finished, or a file from before the flag); else
    (the number of items there, the number planned or None). items: the items' name (default:
    "points" or "records", whichever the document has; None where it has neither)."""
    meta = (doc or {}).get("meta", {})
    if meta.get("complete", True):
        return None
    name = items or next((k for k in ("points", "records") if k in doc), None)
    have = len(doc[name]) if name in doc and isinstance(doc[name], list) else None
    return have, meta.get("planned")


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


def _fingerprint(path):
    """sha256 of the file's bytes, "none" when there is no file."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return "none"


def _hashable(value):
    """A key field as a dictionary key: lists (as JSON gives tuples back) become tuples."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


class Store:
    """A data file of items, each identified by its key: `key` is a function of an item, or a
    tuple of field names. path None keeps the document in memory only. fresh: start afresh,
    keeping none of the stored items (the file is replaced when the run finishes; see the
    module doc for the side file, what is set aside, and when). planned: the items (or just
    their key fields) the run means the file to hold, for the count an unfinished run's figures
    note (plan).

    Finish the run with finish(), or use the store as a context manager, which finishes it when
    the block ends without an exception: until then the file stays as it was."""

    def __init__(self, path, meta, key, items="points", fresh=False, planned=None):
        self.path = None if path is None else Path(path)
        self.items_name = items
        if callable(key):
            self.key_fields, self.key = None, key
        else:
            self.key_fields = tuple(key)
            self.key = lambda item: tuple(_hashable(item.get(f)) for f in self.key_fields)
        #: the stored file this run continues (the side file or the file), None: none
        self.resumed = None
        #: whether the document differs from the file's (a fresh run replaces it in any case)
        self.changed = bool(fresh)
        self.finished = False
        #: [(a file this fresh start (or finish) set aside, where it is now)], for the caller
        #: to report
        self.aside = []
        old = None if self.path is None else self._stored(meta.get("gpu"), fresh)
        if old is not None:
            earlier = old.get("meta", {}).pop("earlier_runs", [])
            meta = {**meta, "earlier_runs": earlier + [old.get("meta", {})]}
        # the file as this run found it: a later resume of its side file checks it is unchanged
        based_on = None if self.path is None else _fingerprint(self.path)
        if self.path is not None and self.resumed == self.partial:
            recorded = (old.get("meta") or {}).get("based_on")
            if recorded is not None and recorded != based_on:
                raise StaleData(
                    f"{self.path} has changed since the unfinished run in {self.partial.name} "
                    f"began, which would replace it with its older data when it finishes: move "
                    f"{self.partial.name} away to resume from {self.path.name}, or pass --fresh "
                    f"(--no-resume) to measure again")
        self.doc = {**(old or {}), "meta": {**meta, "complete": False, "based_on": based_on},
                    items: []}
        self._items = {self.key(item): item for item in (old or {}).get(items, [])}
        self.doc[items] = list(self._items.values())
        if planned is not None:
            self.plan(planned)

    @property
    def partial(self):
        """The side file this run writes as it goes (None in memory)."""
        return None if self.path is None else partial_path(self.path)

    def _check(self, doc, path, gpu, any_gpu=False):
        """Raise unless `doc` (read from `path`) is a data file of this kind, from this GPU
        (any_gpu: or another)."""
        if not isinstance(doc, dict) or not isinstance(doc.get(self.items_name), list):
            raise CorruptData(path, f"it holds no {self.items_name!r} list, so it is not this "
                                    f"kind of data file (or another file was meant)")
        theirs = (doc.get("meta") or {}).get("gpu")
        if not any_gpu and theirs and theirs != gpu:
            raise StaleData(f"{path} was measured on {theirs}, this is {gpu}: measure it "
                            f"afresh here (python -m experiments --fresh, python -m nbflash "
                            f"bench --no-resume) or use another file")

    def _readable(self, path):
        """Is the file at `path` a data file of this kind (any GPU)?"""
        try:
            self._check(load_json(path), path, None, any_gpu=True)
        except CorruptData:
            return False
        return True

    def _stored(self, gpu, fresh):
        """The document this run continues, None for none. A fresh start sets aside an
        unfinished run's side file and a file it cannot read, and continues nothing."""
        if fresh:
            if self.partial.exists():
                tag = "unfinished" if self._readable(self.partial) else "corrupt"
                self.aside.append((self.partial, set_aside(self.partial, tag)))
            if self.path.exists() and not self._readable(self.path):
                self.aside.append((self.path, set_aside(self.path, "corrupt")))
            return None
        for path in (self.partial, self.path):
            doc = load_json(path)
            if doc is not None:
                self._check(doc, path, gpu)
                self.resumed = path
                return doc
        return None

    def plan(self, items):
        """Record in the meta ("planned") how many items the file is to hold when this run
        finishes: `items` (the items, or dictionaries of their key fields) with those stored."""
        keys = set(self._items) | {self.key(item) for item in items}
        self.doc["meta"]["planned"] = len(keys)

    def get(self, *key, **fields):
        """The stored item with this key (or these key fields), or None."""
        return self._items.get(self._key_of(key, fields))

    def done(self, *key, **fields):
        """The stored item with this key (or key fields) and a final status, or None."""
        item = self.get(*key, **fields)
        return item if item is not None and item.get("status") in FINAL else None

    def add(self, item):
        """Store `item` (replacing an earlier one with its key, which moves to the end) and
        write the run's progress (the side file)."""
        key = self.key(item)
        self._items.pop(key, None)
        self._items[key] = item
        self.doc[self.items_name] = list(self._items.values())
        self.write()
        return item

    def write(self):
        """Write the document as it is now to the side file (the run's progress; the file stays
        as it was until finish)."""
        self.changed = True
        if self.path is not None:
            write_json(self.partial, self.doc)

    def finish(self):
        """The run is complete: mark the document so ("complete": true) and put it in place of
        the file (the side file renamed onto it). Where the run changed nothing in the file it
        resumed, the file stays as it was. Returns the document."""
        self.doc["meta"]["complete"] = True
        if self.path is None or self.finished:
            return self.doc
        if self.changed or self.resumed == self.partial or not self.path.exists():
            write_json(self.partial, self.doc)
            if (self.resumed != self.path and self.path.exists()
                    and not self._readable(self.path)):     # damaged since: kept, not replaced
                self.aside.append((self.path, set_aside(self.path, "corrupt")))
            os.replace(self.partial, self.path)
        self.finished = True
        return self.doc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        return False

    def _key_of(self, key, fields):
        if fields:
            return tuple(_hashable(fields.get(f)) for f in self.key_fields)
        return key[0] if len(key) == 1 else key

"""The COMPLETE marker: written last, once every rank finished a save; what makes a tag readable.

Its JSON records the kind of checkpoint (``train``, ``pruned``, ``grown``, ``imported``), the step, the
saving topology (training checkpoints) and every file's size and xxh3-64 digest. A tag without COMPLETE
is partial (a run killed while saving) and is never read; a tag whose files do not match COMPLETE
(missing, truncated, damaged bytes) is refused by name (``verify``). Old tags are retired by renaming
them out of the tag namespace before deleting them, so no crash leaves a half-deleted tag marked complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional

from molm_ds.checkpoint.layout import COMPLETE, LATEST, RETIRED_PREFIX, list_tags

__all__ = ["is_complete", "newest_complete", "read_marker", "mark_complete", "file_digest", "digests",
           "collective_digests", "verify", "retire", "retire_all", "clean_retired"]


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE))


def newest_complete(ckpt_dir: str) -> Optional[str]:
    done = [t for t in list_tags(ckpt_dir) if is_complete(ckpt_dir, t)]
    return done[-1] if done else None


def file_digest(path: str) -> str:
    """xxh3-64 of a file's bytes (about 3 GB/s in memory; reading it back dominates: see docs/training.md)."""
    import xxhash

    h = xxhash.xxh3_64()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def digests(tag_dir: str, names: list[str]) -> dict[str, dict]:
    return {n: {"size": os.path.getsize(os.path.join(tag_dir, n)), "xxh3": file_digest(os.path.join(tag_dir, n))}
            for n in names}


def collective_digests(tag_dir: str, names: list[str]) -> dict[str, dict]:
    """Digests of ``names``, each rank reading an interleaved share (collective); the union on every rank."""
    from molm_ds.parallel import comm

    r, w = comm.rank(), comm.world_size()
    out: dict[str, dict] = {}
    for part in comm.all_gather_object(digests(tag_dir, names[r::w])):
        out.update(part)
    return out


def read_marker(ckpt_dir: str, tag: str) -> dict:
    """The COMPLETE marker's JSON ({} for an empty or unreadable marker of an older molm-ds)."""
    try:
        with open(os.path.join(ckpt_dir, tag, COMPLETE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def mark_complete(tag_dir: str, info: dict, files: dict[str, dict]) -> None:
    """The COMPLETE marker, written last and atomically: what wrote the tag and every file's size and digest."""
    tmp = os.path.join(tag_dir, COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**info, "time": time.time(), "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, COMPLETE))


def verify(ckpt_dir: str, tag: str, *, collective: bool = False) -> Optional[str]:
    """None when every file the marker lists is there with its size and digest, else what is wrong
    (naming the file). ``collective``: ranks share the reading (every rank must call)."""
    d = os.path.join(ckpt_dir, tag)
    marker = read_marker(ckpt_dir, tag)
    if not is_complete(ckpt_dir, tag):
        return f"{d} has no {COMPLETE} marker (partial: a rank did not finish writing)"
    files = marker.get("files")
    if not isinstance(files, dict):
        return None  # written before markers carried digests: nothing to compare against
    missing = sorted(n for n in files if not os.path.isfile(os.path.join(d, n)))
    if missing:
        return f"{d}: file {missing[0]} is missing ({len(missing)} of {len(files)} files missing)"
    for n, want in files.items():
        size = os.path.getsize(os.path.join(d, n))
        if size != want["size"]:
            return f"{d}: file {n} has {size} bytes, the marker says {want['size']} (truncated or replaced)"
    names = sorted(n for n in files if "xxh3" in files[n])
    got = collective_digests(d, names) if collective else digests(d, names)
    bad = [n for n in names if got[n]["xxh3"] != files[n]["xxh3"]]
    if bad:
        return f"{d}: file {bad[0]} does not match its digest (damaged bytes; {len(bad)} file(s) differ)"
    return None


def retire(ckpt_dir: str, tag: str) -> None:
    """Delete a tag so that no crash can leave it half deleted but marked: first move it out of the tag
    namespace (one atomic rename), then remove it."""
    trash = os.path.join(ckpt_dir, f"{RETIRED_PREFIX}{tag}-{os.getpid()}")
    os.replace(os.path.join(ckpt_dir, tag), trash)
    shutil.rmtree(trash, ignore_errors=True)


def retire_all(ckpt_dir: str) -> None:
    """Delete every tag of a checkpoint directory (an explicit overwrite), safely."""
    for tag in list_tags(ckpt_dir):
        retire(ckpt_dir, tag)
    if os.path.isfile(os.path.join(ckpt_dir, LATEST)):
        os.remove(os.path.join(ckpt_dir, LATEST))


def clean_retired(ckpt_dir: str) -> None:
    for name in os.listdir(ckpt_dir):
        if name.startswith(RETIRED_PREFIX):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)

"""The COMPLETE marker: written last, once every rank finished a save; what makes a tag readable.

Its JSON records the kind of checkpoint (``train``, ``pruned``, ``grown``, ``imported``), the step, the
saving topology (training checkpoints), every file's size and xxh3-64 digest, its format and an xxh3-64
checksum of all that (canonical JSON), so the marker proves itself: an empty, cut-short, undecodable,
checksum-less, edited or schema-less marker means "not verified", exactly like a missing one. A tag
without a verified marker is partial (a run killed or a disk full while saving) and is never read;
a tag whose files do not match COMPLETE (missing, truncated, damaged bytes) is refused by name
(``verify``); files COMPLETE does not list are reported and never loaded. Old tags are retired by renaming
them out of the tag namespace before deleting them, so no crash leaves a half-deleted tag marked complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Optional

from molm_ds.checkpoint.layout import COMPLETE, LATEST, RETIRED_PREFIX, list_tags, tag_files
from molm_ds.log import get_logger

log = get_logger("checkpoint.marker")

__all__ = ["is_complete", "newest_complete", "read_marker", "marker_problem", "unlisted_files", "mark_complete", "file_digest", "digests",
           "collective_digests", "verify", "retire", "retire_all", "clean_retired"]


def is_complete(ckpt_dir: str, tag: str) -> bool:
    """Whether the tag's COMPLETE marker proves itself (its checksum and schema; the files are checked by
    ``verify``)."""
    return marker_problem(ckpt_dir, tag)[1] is None


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


MARKER_FORMAT = 2
_DIGEST = re.compile(r"^[0-9a-f]{16}$")


def _checksum(body: dict) -> str:
    """xxh3-64 of the marker's canonical JSON without its checksum field."""
    import xxhash

    return xxhash.xxh3_64(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _schema_problem(m: dict) -> Optional[str]:
    """What in a checksum-valid marker does not fit the schema (None when it fits)."""
    if m.get("format") != MARKER_FORMAT:
        return f"format {m.get('format')!r}, not {MARKER_FORMAT}"
    if not isinstance(m.get("kind"), str):
        return "no 'kind'"
    if not isinstance(m.get("time"), (int, float)) or isinstance(m.get("time"), bool):
        return "no 'time'"
    if m.get("step") is not None and (not isinstance(m["step"], int) or isinstance(m["step"], bool) or m["step"] < 0):
        return f"a bad 'step' {m['step']!r}"
    if "topology" in m and not isinstance(m["topology"], dict):
        return "a bad 'topology'"
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return "no 'files'"
    for name, rec in files.items():
        parts = name.split("/")
        if os.path.isabs(name) or ".." in parts or "" in parts or "\\" in name:
            return f"a file name {name!r} outside its tag"
        if not (isinstance(rec, dict) and isinstance(rec.get("size"), int) and not isinstance(rec.get("size"), bool)
                and rec["size"] >= 0 and isinstance(rec.get("xxh3"), str) and _DIGEST.match(rec["xxh3"])):
            return f"a bad record for {name!r}"
    return None


def marker_problem(ckpt_dir: str, tag: str) -> tuple[Optional[dict], Optional[str]]:
    """(marker, None) when the tag's COMPLETE marker proves itself (its own checksum, the schema), else
    (None, why it is not verified)."""
    path = os.path.join(ckpt_dir, tag, COMPLETE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, f"{os.path.join(ckpt_dir, tag)} has no {COMPLETE} marker (partial: a rank did not finish writing)"
    except OSError as e:
        return None, f"{path} cannot be read ({e.strerror or e})"
    if not raw.strip():
        return None, f"{path} is empty (a crash or a full disk while it was written), so the tag is not verified"
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{path} is not valid JSON (damaged bytes), so the tag is not verified"
    if not isinstance(m, dict) or not isinstance(m.get("checksum"), str):
        return None, (f"{path} carries no checksum (written by an older molm-ds or by hand), so the tag is not "
                      "verified")
    body = {k: v for k, v in m.items() if k != "checksum"}
    if _checksum(body) != m["checksum"]:
        return None, f"{path} does not match its own checksum (damaged or edited), so the tag is not verified"
    why = _schema_problem(body)
    if why is not None:
        return None, f"{path} has {why}, so the tag is not verified"
    return body, None


def read_marker(ckpt_dir: str, tag: str) -> dict:
    """The COMPLETE marker of a tag (its checksum and schema checked); CheckpointError naming the file when
    it does not prove itself."""
    from molm_ds.errors import CheckpointError

    m, problem = marker_problem(ckpt_dir, tag)
    if problem is not None:
        raise CheckpointError(problem)
    return m


def mark_complete(tag_dir: str, info: dict, files: dict[str, dict]) -> None:
    """The COMPLETE marker, written last and atomically: what wrote the tag, every file's size and digest,
    and a checksum of all that, so a damaged marker is told from a good one."""
    body = {**info, "format": MARKER_FORMAT, "time": time.time(), "files": files}
    tmp = os.path.join(tag_dir, COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**body, "checksum": _checksum(body)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(tag_dir, COMPLETE))


def unlisted_files(ckpt_dir: str, tag: str, marker: dict) -> list[str]:
    """Files in a tag that its marker does not list (never loaded: readers take only listed files)."""
    return [n for n in tag_files(os.path.join(ckpt_dir, tag)) if n not in marker["files"]]


def verify(ckpt_dir: str, tag: str, *, collective: bool = False) -> Optional[str]:
    """None when the marker proves itself (``marker_problem``) and every file it lists is there with its
    size and digest, else what is wrong (naming the file). Files the marker does not list are reported
    (a warning) and never loaded (``layout.listed_files``). ``collective``: ranks share the reading
    (every rank must call)."""
    d = os.path.join(ckpt_dir, tag)
    marker, problem = marker_problem(ckpt_dir, tag)
    if problem is not None:
        return problem
    files = marker["files"]
    extra = unlisted_files(ckpt_dir, tag, marker)
    if extra:
        log.warning("%s: %d file(s) that its %s marker does not list, ignored (never loaded): %s", d, len(extra),
                    COMPLETE, ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
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

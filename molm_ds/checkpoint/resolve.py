"""Which tag a path or ``resume`` setting means: the newest complete one, a named one, or none."""

from __future__ import annotations

import os
from typing import Optional

from molm_ds.checkpoint.layout import COMPLETE, MODEL_FILE, is_tag, list_tags, step_of
from molm_ds.checkpoint.marker import is_complete, marker_problem, newest_complete, verify
from molm_ds.errors import CheckpointError
from molm_ds.log import get_logger

log = get_logger("checkpoint")

__all__ = ["resolve", "resolve_resume"]


def resolve(path: str, *, what: str = "checkpoint") -> tuple[str, str]:
    """(checkpoint dir, tag) for a checkpoint directory (its newest complete tag) or a tag directory
    (which must be complete). ``what`` names the option in error messages (``init_from``, ``--checkpoint``)."""
    p = os.path.normpath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{what}: {path} does not exist; give a checkpoint directory or a step_NNNNNNNN tag "
                              "directory of a finished run")
    if os.path.isfile(os.path.join(p, MODEL_FILE)) or is_tag(os.path.basename(p)):  # a tag directory
        parent, tag = os.path.dirname(p) or ".", os.path.basename(p)
        _, problem = marker_problem(parent, tag)
        if problem is not None:
            older = [t for t in list_tags(parent) if is_complete(parent, t) and t != tag]
            raise CheckpointError(f"{what}: {p} is not a complete checkpoint ({problem}); use a complete one"
                                  f"{': ' + os.path.join(parent, older[-1]) if older else ''}")
        return parent, tag
    tag = newest_complete(p)
    if tag is None:
        raise CheckpointError(f"{what}: no complete checkpoint in {p} (tags found: {list_tags(p) or 'none'})")
    return p, tag


def resolve_resume(resume: Optional[str], ckpt_dir: str, *, collective: bool = False) -> Optional[tuple[str, str]]:
    """(checkpoint dir, tag) to resume from, or None for a fresh start. Every candidate is verified
    against its COMPLETE marker (sizes and digests; ``collective``: the ranks share the reading, every
    rank must call).

    ``auto``: the newest tag in ckpt_dir that verifies, saying which newer ones it skipped and why; no
    tags at all, or only unfinished saves (no marker at all) = fresh start (logged); tags with markers but
    none usable = error. A path: a checkpoint directory (its
    newest complete tag) or a tag directory; missing, partial or damaged = an error naming the problem,
    never a fresh start.
    """
    if resume is None:
        return None
    if resume != "auto":
        d, tag = resolve(resume, what="resume")
        problem = verify(d, tag, collective=collective)
        if problem is not None:
            older = [t for t in list_tags(d) if is_complete(d, t) and step_of(t) < step_of(tag)]
            raise CheckpointError(f"resume: {problem}; resume from an older checkpoint"
                                  + (f" ({os.path.join(d, older[-1])})" if older else "") + " or start fresh")
        return d, tag
    tags = list_tags(ckpt_dir)
    if not tags:
        log.info("resume: auto: no checkpoint in %s, starting fresh", ckpt_dir)
        return None
    problems = []
    for tag in reversed(tags):
        problem = verify(ckpt_dir, tag, collective=collective)
        if problem is None:
            for p in problems:
                log.warning("resume: auto: skipping %s", p)
            return ckpt_dir, tag
        problems.append(problem)
    if not any(os.path.lexists(os.path.join(ckpt_dir, t, COMPLETE)) for t in tags):
        # only saves that never finished (killed, or a full disk): nothing was ever complete, so this is a
        # fresh start, which the trainer refuses over an earlier run's files unless --overwrite
        log.warning("resume: auto: no complete checkpoint in %s, only unfinished saves (%s)", ckpt_dir, ", ".join(tags))
        return None
    raise CheckpointError(f"resume: auto: no usable checkpoint in {ckpt_dir} ({'; '.join(problems)}); delete them to "
                          "start fresh or point resume at a complete one")

"""``--pile-subset`` names checked against the ``meta.pile_set_name`` values the input really holds.

Names are matched exactly (``ArXiv``, ``Pile-CC``, ``Wikipedia (en)``). Before any work,
``check_before_run`` reads the first records of the Pile inputs (``PEEK_RECORDS``, well within
the first MiB of a real Pile file) and refuses a name that was not seen there but is close to one
that was (``arxiv`` -> "did you mean 'ArXiv'?"). A name with no close match may still be a rare
subset, so it is only reported at the end if it matched nothing (``unmatched``).
"""

from __future__ import annotations

import difflib
from typing import Iterable

from data_prep.readers import ReadStats, SourceSpec, read_json_records
from molm_ds.errors import ConfigError, DataError

PEEK_RECORDS = 2000


def suggest(name: str, seen: Iterable[str]) -> str | None:
    """The seen name the user probably meant: same letters in another case, else the closest spelling."""
    seen = sorted(set(seen))
    folded = {s.casefold(): s for s in seen}
    if name.casefold() in folded:
        return folded[name.casefold()]
    close = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.75)
    return folded[close[0]] if close else None


def describe_seen(seen: dict) -> str:
    names = sorted(seen, key=lambda n: (-seen[n], n))
    shown = ", ".join(repr(n) for n in names[:12])
    return shown + (f" and {len(names) - 12} more" if len(names) > 12 else "") if names else "none"


def unmatched_message(name: str, seen: dict) -> str:
    hint = suggest(name, seen)
    return (f"--pile-subset {name!r} matched no record" + (f"; did you mean {hint!r}?" if hint else "")
            + f" (names seen: {describe_seen(seen)})")


def peek_set_names(specs: list[SourceSpec], limit: int = PEEK_RECORDS) -> dict:
    """meta.pile_set_name counts in the first ``limit`` records of the Pile inputs. Corrupt input ends the
    peek there (without searching on for what decodes): the run itself reports it."""
    stats = ReadStats()
    n = 0
    for spec in specs:
        if spec.kind != "pile":
            continue
        try:
            for _ in read_json_records(spec.path, stats=stats):
                n += 1
                if n >= limit:
                    return stats.set_names
        except DataError:
            return stats.set_names
    return stats.set_names


def check_before_run(specs: list[SourceSpec], subsets: set[str] | None) -> None:
    """ConfigError for a requested name that is absent from the first records but close to a present one."""
    if not subsets or not any(s.kind == "pile" for s in specs):
        return
    seen = peek_set_names(specs)
    for name in sorted(subsets):
        if name not in seen:
            hint = suggest(name, seen)
            if hint is not None and hint not in subsets:
                raise ConfigError(f"--pile-subset {name!r} is not a set name of these inputs; did you mean {hint!r}? "
                                  f"(names in the first records: {describe_seen(seen)})")


def unmatched(subsets: set[str] | None, seen: dict) -> list[str]:
    """The requested names that matched no record, each with its message."""
    return [unmatched_message(n, seen) for n in sorted(subsets or ()) if n not in seen]

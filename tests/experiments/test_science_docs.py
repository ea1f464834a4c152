"""docs/science.md quotes committed results only: every number on the page outside code (a decimal such as
22.41 or 0.003, or a grouped integer such as 2,479,722) appears verbatim (digit grouping aside) in one of the committed files the
section names with ``<!-- numbers from: PATH [PATH ...] -->`` (``none``: the section may quote no number) (files under docs/science/, written by the
harness: results.md, results.json, corpus.json), and each of those results carries its corpus hash and
producing commit. Commands and identifiers (inside backticks) are not results and are not checked."""

import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join(REPO, "docs", "science.md")
MARK = re.compile(r"<!-- numbers from: (.*?) -->")
NUM = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?![\w]|\.\d|,\d{3})")


def strip_code(text: str) -> str:
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", " ", text)
    return re.sub(r"arXiv \d+\.\d+", " ", text)  # paper ids are not results


def sections(text: str) -> list[tuple[list[str], str]]:
    """(source files, text) for each stretch of the page; the stretch before the first marker has none."""
    out, files, pos = [], [], 0
    for m in MARK.finditer(text):
        out.append((files, text[pos:m.start()]))
        files, pos = [f for f in m.group(1).split() if f != "none"], m.end()  # none: no numbers allowed
    out.append((files, text[pos:]))
    return out


def test_numbers_extracted_as_meant():
    t = strip_code("ppl 22.41 ± 0.35 at 0.003, 2,479,722 tokens, `--lrs 3e-3,1e-2` arXiv 2306.04640, 4-8 billion")
    assert NUM.findall(t) == ["22.41", "0.35", "0.003", "2,479,722"]


def test_every_number_on_the_page_is_in_the_committed_file_it_comes_from():
    text = open(PAGE, encoding="utf-8").read()
    missing = []
    for files, body in sections(text):
        source = ""
        for f in files:
            path = os.path.join(REPO, f)
            assert os.path.isfile(path), f"docs/science.md names {f}, which is not committed"
            source += open(path, encoding="utf-8").read() + "\n"
        found = {x.replace(",", "") for x in NUM.findall(source)}  # JSON writes 2479722, the page 2,479,722
        found |= set(re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])", source))
        for n in NUM.findall(strip_code(body)):
            if n.replace(",", "") not in found:
                missing.append((n, files or "(no source named)"))
    assert not missing, f"numbers in docs/science.md not in their source files: {missing}"


def test_committed_results_record_corpus_and_commit():
    text = open(PAGE, encoding="utf-8").read()
    named = {f for files, _ in sections(text) for f in files}
    results = [f for f in named if f.endswith("results.md")]
    assert results, "docs/science.md cites no committed results"
    corpus = json.load(open(os.path.join(REPO, "docs", "science", "corpus.json")))
    for f in results:
        res = json.load(open(os.path.join(REPO, os.path.dirname(f), "results.json")))
        same = {corpus["content"]["corpus_sha256"], *corpus["content"].get("earlier_hashes", {})}
        assert len(res["corpus_sha256"]) == 64 and res["corpus_sha256"] in same, f
        assert re.fullmatch(r"[0-9a-f]{40}", res["commit"]), f
        md = open(os.path.join(REPO, f), encoding="utf-8").read()
        assert res["corpus_sha256"] in md and res["commit"] in md, f

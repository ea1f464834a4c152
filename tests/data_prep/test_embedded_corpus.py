"""The embedded corpus: layout, idempotence, the two domains, and the loader on top of it."""

import os

import sentencepiece as spm
import torch

from data_prep.embedded import CODE, PROSE, build_embedded, code_documents, prose_documents
from data_prep.readers import read_blank_separated, read_json_records
from molm_ds.data import DataSource, MixtureLoader, read_manifest, tokenizer_info


def test_build_layout_idempotent_and_loadable(tmp_path):
    out = str(tmp_path / "emb")
    msgs = []
    man = build_embedded(out, vocab_size=512, code_bytes=200_000, say=msgs.append)
    for rel in ("tokenizer.model", "manifest.json", "pile/train/00.jsonl.zst", "cc100/en.txt.xz",
                "shards/prose/manifest.json", "shards/code/manifest.json"):
        assert os.path.exists(os.path.join(out, rel)), rel
    assert any("tokenizer" in m for m in msgs)
    mtime = os.path.getmtime(os.path.join(out, "tokenizer.model"))
    msgs.clear()
    assert build_embedded(out, vocab_size=512, code_bytes=200_000, say=msgs.append) == man
    assert msgs == [f"embedded corpus in {out} is up to date ({out}/manifest.json)"]
    assert os.path.getmtime(os.path.join(out, "tokenizer.model")) == mtime

    pile = os.path.join(out, "pile/train/00.jsonl.zst")
    assert list(read_json_records(pile, subsets={PROSE})) == prose_documents()
    assert list(read_json_records(pile, subsets={CODE})) == code_documents(200_000)
    cc = list(read_blank_separated(os.path.join(out, "cc100/en.txt.xz")))
    assert len(cc) == len(prose_documents()) and cc[0].split("\n")[0] == prose_documents()[0].split("\n")[0]

    info = tokenizer_info(out)
    assert (info.vocab_size, info.eos_id) == (512, 2) and info.model_path == os.path.join(out, "tokenizer.model")
    assert tokenizer_info(os.path.join(out, "shards/code")).sha256 == info.sha256
    assert man["domains"]["prose"]["tokens"] == read_manifest(os.path.join(out, "shards/prose"))["tokens"]

    sp = spm.SentencePieceProcessor(model_file=info.model_path)
    for domain, marker in (("prose", None), ("code", "def ")):
        L = MixtureLoader([DataSource(os.path.join(out, "shards", domain))], seq_len=128, micro_batch_size=4, seed=0)
        b = L.next_batch()
        assert int(b["input_ids"].max()) < 512
        if marker:
            assert any(marker in sp.decode(r.tolist()) for r in L.next_batch()["input_ids"])
    # decode(encode(doc)) is lossless with this tokenizer, code indentation included
    doc = code_documents(200_000)[0]
    assert sp.decode(sp.encode(doc)) == doc

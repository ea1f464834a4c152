"""molm_ds.heap: launch/pretrain.py's command line runs its start-up (imports, model, engine, resume)
without a single garbage collection, then freezes what it built and trains with the collector on; a
caller of its main() keeps its own collector."""

import gc
import json
import subprocess
import sys

from molm_ds import heap
from molm_ds.testing import REPO, job_args, launch_env

# every collection's start records whether heap.hold() was in force and how many objects were frozen by then
_RECORD = """
import gc, json, sys
seen = []

def held():
    heap = sys.modules.get("molm_ds.heap")
    return bool(heap and heap._held)

gc.callbacks.append(lambda phase, info: phase == "start" and seen.append((held(), gc.get_freeze_count())))
sys.path.insert(0, {repo!r})
import atexit  # the record is printed by an atexit handler: a command line ends through cli.run's os._exit
atexit.register(lambda: print("GC " + json.dumps({{"during_hold": sum(h for h, _ in seen), "enabled": gc.isenabled(),
                                                  "frozen_at_each": [n for _, n in seen], "frozen": gc.get_freeze_count()}}), flush=True))
{body}
"""


def _record(body: str, env=None) -> dict:
    code = _RECORD.format(repo=str(REPO), body=body)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("GC "))[3:])


def test_pretrain_collects_nothing_before_its_start_up_ends_and_collects_after(shard, tmp_path):
    argv = job_args(shard, tmp_path / "run", ep_size=1)
    got = _record(f"sys.argv = {argv!r}\nfrom launch import pretrain\npretrain.entry()", env=launch_env())
    assert got["during_hold"] == 0, got  # start-up: not one collection
    assert got["enabled"] and max(got["frozen_at_each"]) > 100_000, got  # training: collections, start-up frozen
    assert got["frozen"] == 0, got  # unfrozen at the exit (its atexit handler ran before the record's)
    # the record can show collections during start-up: the imports alone run many without hold()
    imports = _record("import torch, torch._dynamo")
    assert len(imports["frozen_at_each"]) > 5 and imports["frozen"] == 0, imports


def test_a_caller_of_main_keeps_its_collector_on_through_an_early_error(tmp_path):
    got = _record(f"from launch import pretrain\ntry:\n    pretrain.main(['--config', {str(tmp_path / 'none.yaml')!r}])\n"
                  "except Exception as e:\n    assert 'not found' in str(e)\nx = [[] for _ in range(100000)]\n")
    assert got["enabled"] and got["during_hold"] == 0 and got["frozen"] == 0 and got["frozen_at_each"], got


def test_release_without_hold_leaves_the_collector_alone():
    was = gc.isenabled()
    frozen = gc.get_freeze_count()
    heap.release()
    assert gc.isenabled() == was and gc.get_freeze_count() == frozen


def test_hold_then_release_freezes_once():
    code = ("from molm_ds import heap\nheap.hold()\nassert not gc.isenabled()\nx = [[] for _ in range(10000)]\n"
            "heap.release()\nn = gc.get_freeze_count()\nheap.release()\nassert gc.get_freeze_count() == n > 10000\n"
            "y = [[i] for i in range(100000)]\n")
    got = _record(code)
    assert got["during_hold"] == 0 and got["enabled"] and max(got["frozen_at_each"]) > 10000, got

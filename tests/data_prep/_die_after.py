"""``python _die_after.py ARGS``: ``python -m data_prep.build_shards ARGS`` whose rank ``$DIE_RANK`` dies
like ``kill -9`` (no cleanup, nothing flushed) after writing ``$DIE_AFTER`` shards; the launcher then ends
the other ranks wherever they are."""

import os
import sys

from data_prep import build_shards as bs
from molm_ds import cli

if __name__ == "__main__":
    real_finish, done = bs.IndexedShardWriter.finish, [0]
    if os.environ.get("OMPI_COMM_WORLD_RANK", "0") == os.environ["DIE_RANK"]:
        def finish(self):
            if done[0] == int(os.environ["DIE_AFTER"]):
                os._exit(9)
            done[0] += 1
            return real_finish(self)

        bs.IndexedShardWriter.finish = finish
    cli.run(bs.main)

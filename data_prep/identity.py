"""What identifies an input file's content, cheaply enough to check on every run.

``identity(path)`` = size, modification time (ns) and the SHA-256 of ``SAMPLES`` blocks of
``SAMPLE_BYTES`` at evenly spaced offsets (the first and the last block included), so about 1 MiB
is read per file whatever its size. A change that keeps the size shows in the time (any write
updates it) or in a sampled block; a file copied without its time (same bytes) shows as a time
change only, which ``describe_change`` words as such. ``file_sha256`` (every byte, SHA-256) is the
full checksum, computed by ``build_shards`` while it reads anyway and kept in the manifest.

    python -m data_prep.identity FILE... [--full]   # print each identity and the time taken
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

SAMPLES = 17
SAMPLE_BYTES = 1 << 16


def sample_offsets(size: int) -> list[int]:
    if size <= SAMPLES * SAMPLE_BYTES:
        return [0] if size else []
    last = size - SAMPLE_BYTES
    return sorted({round(i * last / (SAMPLES - 1)) for i in range(SAMPLES)})


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        for off in sample_offsets(st.st_size):
            f.seek(off)
            h.update(f.read(SAMPLE_BYTES if st.st_size > SAMPLES * SAMPLE_BYTES else st.st_size))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha256": h.hexdigest()}


def identity(path: str) -> dict:
    """Size, mtime and sampled hash of a file; for a directory (a saved dataset), of all its files.
    DataError when it cannot be read."""
    try:
        return _identity(path)
    except OSError as e:
        from molm_ds.errors import DataError

        raise DataError(f"cannot read input {path}: {e.strerror or e}") from None


def _identity(path: str) -> dict:
    if not os.path.isdir(path):
        return _file_identity(path)
    h, size, mtime = hashlib.sha256(), 0, 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            ident = _file_identity(p)
            h.update(f"{os.path.relpath(p, path)}\0{ident['sample_sha256']}\0".encode())
            size += ident["size"]
            mtime = max(mtime, ident["mtime_ns"])
    return {"size": size, "mtime_ns": mtime, "sample_sha256": h.hexdigest()}


def describe_change(path: str, old: dict, new: dict) -> str:
    """How ``path`` differs from when ``old`` was taken, and what that means."""
    if old.get("size") != new.get("size") or old.get("sample_sha256") != new.get("sample_sha256"):
        what = (f"size {old.get('size')} -> {new.get('size')}" if old.get("size") != new.get("size")
                else "sampled content differs")
        return f"{path} changed ({what})"
    sec, ns = divmod(int(old.get("mtime_ns") or 0), 10**9)
    return (f"{path} was modified (mtime changed; size and sampled blocks are the same). If its bytes are "
            f"unchanged (copied or touched), restore the time with: touch -d @{sec}.{ns:09d} {path}")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    from molm_ds import cli
    from molm_ds.errors import DataError

    p = cli.ArgumentParser(prog="python -m data_prep.identity", description=__doc__)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--full", action="store_true", help="also time a full SHA-256 of each file, for comparison")
    a = p.parse_args(argv)
    for path in a.files:
        if not os.path.exists(path):
            raise DataError(f"no such file {path}")
        t0 = time.perf_counter()
        ident = identity(path)
        dt = time.perf_counter() - t0
        line = (f"{path}: size {ident['size']}, mtime_ns {ident['mtime_ns']}, sample_sha256 "
                f"{ident['sample_sha256'][:16]}... in {dt * 1e3:.1f} ms")
        if a.full and not os.path.isdir(path):
            t0 = time.perf_counter()
            file_sha256(path)
            full = time.perf_counter() - t0
            line += f"; full sha256 in {full * 1e3:.1f} ms ({ident['size'] / max(full, 1e-9) / 1e6:.0f} MB/s)"
        print(line)
    return 0


if __name__ == "__main__":
    from molm_ds import cli

    cli.run(main)

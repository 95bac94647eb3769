"""What the tensor store holds beyond its tensors' data, per handle and per tensor: the
figures behind server.store's STORE_BYTES_PER_HANDLE and STORE_BYTES_PER_TENSOR.

    python bench/bench_store_memory.py

Handles are made as PutTensors makes them (chunks assembled by gradserve.v1.chunks
into a TensorStore), many at once, and the process's resident memory is read
before and after (/proc/self/status): per handle with one 4-byte tensor, and per
extra tensor with 50 tensors a handle. Prints bytes per item beside the constants
the store counts; never asserts.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import numpy as np

from gradserve.server.store import (STORE_BYTES_PER_HANDLE, STORE_BYTES_PER_TENSOR,
                                    TensorStore, Upload)
from gradserve.v1.chunks import write_chunks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.process_stats import status_mib  # noqa: E402


def rss_bytes() -> float:
    gc.collect()
    return status_mib(os.getpid()) * (1 << 20)


def handles(store: TensorStore, count: int, tensors: int) -> list:
    arrays = {f"param_{i}": np.float32([i]) for i in range(tensors)}
    messages = list(write_chunks(arrays))
    kept = []
    for _ in range(count):
        upload = Upload(store, "ipv4:127.0.0.1", None)
        for m in messages:
            upload.add(m)
        kept.append(upload.finish())
    return kept


def main() -> int:
    store = TensorStore(1 << 40, 1 << 40, 1 << 30, 3600)
    handles(store, 100, 50)  # warm-up: allocator pools, code paths
    before = rss_bytes()
    kept = handles(store, 20_000, 1)
    per_handle = (rss_bytes() - before) / len(kept)
    before = rss_bytes()
    kept2 = handles(store, 400, 50)
    per_tensor = ((rss_bytes() - before) / len(kept2) - per_handle) / 49
    print(f"per handle (one 4-byte tensor): {per_handle:,.0f} B resident; the store counts "
          f"{STORE_BYTES_PER_HANDLE + STORE_BYTES_PER_TENSOR + 4:,} B")
    print(f"per further tensor (4 bytes of data): {per_tensor:,.0f} B resident; the store "
          f"counts {STORE_BYTES_PER_TENSOR + 4:,} B")
    del kept, kept2
    return 0


if __name__ == "__main__":
    sys.exit(main())

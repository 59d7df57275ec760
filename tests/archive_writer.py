"""A real archive writer for the crash and lock tests, deterministic so a checker can tell what it wrote.

Token t of layer l always gets the same record bytes (`expected_records`), however the writer chunked its appends,
layer l's key mean is always `expected_key_mean(l)`, and the state committed at n tokens is `expected_state(n)`. So
after a crash at any instant, a reopened archive at n committed tokens must hold exactly expected_records(l, 0, n),
those key means and expected_state(n).

    python tests/archive_writer.py write PATH SEED   # append + commit until killed; prints each committed count
    python tests/archive_writer.py hold PATH         # open for writing, print "ready", sleep until killed
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

from infinitekv import codec
from infinitekv.archive import Archive, Layout

HEAD_DIM = 16
LAYOUT = Layout(n_layers=3, n_kv_heads=2, head_dim=HEAD_DIM, record_bytes=codec.record_bytes(HEAD_DIM))
BLOCK_TOKENS = 16
FINGERPRINT = "writer-test-model"
_POOL_TOKENS = 4096


@functools.lru_cache(maxsize=1)
def _pool() -> np.ndarray:
    return np.random.default_rng(1234).integers(0, 256, (LAYOUT.n_layers, _POOL_TOKENS, LAYOUT.n_kv_heads,
                                                          LAYOUT.record_bytes), dtype=np.uint8)


def expected_records(layer: int, lo: int, hi: int) -> np.ndarray:
    """uint8 [hi - lo, n_kv_heads, record_bytes]: random bytes, with the token index stamped into the first 4."""
    tokens = np.arange(lo, hi)
    out = _pool()[layer, tokens % _POOL_TOKENS].copy()
    out[:, :, :4] = tokens.astype("<u4").view(np.uint8).reshape(-1, 1, 4)
    return out


def expected_key_mean(layer: int) -> np.ndarray:
    """float32 [n_kv_heads, head_dim]: layer l's key centre mu, distinct per layer."""
    return np.linspace(-1, 1, LAYOUT.n_kv_heads * HEAD_DIM, dtype=np.float32).reshape(LAYOUT.n_kv_heads, -1) + layer


def expected_state(n: int) -> tuple[dict[str, np.ndarray], dict]:
    return {"token_ids": np.arange(n, dtype=np.int32), "hot": np.full((2, 3), n, np.float32)}, {"n": n}


def create_or_open(path: str) -> Archive:
    """The archive at path, ready to append to: every layer's key mean set (again, after a crash lost it)."""
    if os.path.exists(os.path.join(path, "MANIFEST")):
        arc = Archive.open(path, model_fingerprint=FINGERPRINT)
    else:
        arc = Archive.create(path, LAYOUT, FINGERPRINT, block_tokens=BLOCK_TOKENS)
    for layer in range(LAYOUT.n_layers):
        arc.set_key_mean(layer, expected_key_mean(layer))  # a no-op where it is already set
    return arc


def write_until_killed(path: str, seed: int, report_fd: int) -> None:
    """Append random-sized steps to every layer and commit most of them; write each committed count to report_fd."""
    rng = np.random.default_rng(seed)
    arc = create_or_open(path)
    n = arc.committed_tokens
    while True:
        k = int(rng.integers(1, 40))
        for layer in range(LAYOUT.n_layers):
            arc.append(layer, expected_records(layer, n, n + k))
        n += k
        if rng.random() < 0.7:
            arc.commit(*expected_state(n))
            os.write(report_fd, f"{n}\n".encode())


def main(argv: list[str]) -> None:
    command, path = argv[0], argv[1]
    if command == "write":
        write_until_killed(path, int(argv[2]), sys.stdout.fileno())
    elif command == "hold":
        arc = create_or_open(path)
        print("ready", flush=True)
        time.sleep(600)
        arc.close()
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

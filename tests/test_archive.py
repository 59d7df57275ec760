"""The archive's contract with the engine: what append/commit/open keep and serve, what they refuse, pack/unpack."""

from __future__ import annotations

import base64
import json
import mmap
import os
import signal
import struct
import time

import numpy as np
import pytest
import xxhash

from infinitekv import codec
from infinitekv.archive import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MANIFEST_NAME,
    Archive,
    Layout,
    inspect_archive,
    pack,
    shard_name,
    unpack,
)
from infinitekv.errors import IKVError

HEAD_DIM = 16
LAYOUT = Layout(n_layers=3, n_kv_heads=2, head_dim=HEAD_DIM, record_bytes=codec.record_bytes(HEAD_DIM))
FINGERPRINT = "smollm2-135m-instruct:0123456789abcdef"


def key_mean(layer: int, layout: Layout = LAYOUT) -> np.ndarray:
    """Layer l's key centre mu in these tests: float32 [n_kv_heads, head_dim], distinct per layer."""
    return np.random.default_rng(100 + layer).standard_normal((layout.n_kv_heads, layout.head_dim)).astype(np.float32)


def new_archive(path, layout: Layout = LAYOUT, **kwargs) -> Archive:
    """Archive.create with every layer's key mean set: ready to append to."""
    arc = Archive.create(path, layout, FINGERPRINT, **kwargs)
    for layer in range(layout.n_layers):
        arc.set_key_mean(layer, key_mean(layer, layout))
    return arc


def encoded_records(rng: np.random.Generator, n: int) -> np.ndarray:
    """Real codec records [n, n_kv_heads, record_bytes] for random keys and values."""
    flat = codec.encode_records(rng.standard_normal((n * 2, HEAD_DIM)), rng.standard_normal((n * 2, HEAD_DIM)))
    return flat.reshape(n, 2, LAYOUT.record_bytes)


def random_records(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 2, LAYOUT.record_bytes), dtype=np.uint8)


def append_in_chunks(arc: Archive, per_layer: list[np.ndarray], rng: np.random.Generator) -> None:
    """Append each layer's records in random-sized chunks, one step (every layer) at a time, like the engine."""
    n, done = len(per_layer[0]), 0
    while done < n:
        k = min(int(rng.integers(1, 30)), n - done)
        for layer, recs in enumerate(per_layer):
            arc.append(layer, recs[done : done + k])
        done += k


def assert_serves(arc: Archive, per_layer: list[np.ndarray]) -> None:
    """records/signatures/key_weights equal what was appended and what the codec derives from it."""
    for layer, expected in enumerate(per_layer):
        np.testing.assert_array_equal(arc.records(layer), expected)
        sigs = arc.signatures(layer)
        assert sigs.flags.c_contiguous and sigs.dtype == np.uint8
        np.testing.assert_array_equal(sigs, codec.signatures_from_records(expected, HEAD_DIM))
        weights = arc.key_weights(layer)
        assert weights.dtype == np.float16  # the record's field, bit for bit (nan payloads of random bytes too)
        np.testing.assert_array_equal(weights.view(np.uint16),
                                      codec.record_fields(expected, HEAD_DIM)[2][..., 1].view(np.uint16))
        np.testing.assert_array_equal(weights.astype(np.float32), codec.key_mean_abs(expected, HEAD_DIM))


def make_archive(path, n_committed: int, n_tail: int = 0, seed: int = 0, block_tokens: int = 16):
    """A closed disk archive with n_committed committed tokens (+ n_tail appended, not committed); its records."""
    rng = np.random.default_rng(seed)
    records = [random_records(rng, n_committed + n_tail) for _ in range(LAYOUT.n_layers)]
    with new_archive(path, block_tokens=block_tokens, meta={"rope_theta": 1e4}) as arc:
        append_in_chunks(arc, [r[:n_committed] for r in records], rng)
        arc.commit({"token_ids": np.arange(n_committed, dtype=np.int64)}, {"n": n_committed})
        append_in_chunks(arc, [r[n_committed:] for r in records], rng)
    return records


def mapping_of(arr: np.ndarray):
    """The object at the bottom of an array's chain of bases (an mmap for a memory-mapped shard)."""
    base = arr
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    return base


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("block_tokens", [1, 7, 16, 4096])
def test_disk_archive_reopens_with_every_committed_record_and_its_derived_index(tmp_path, block_tokens):
    rng = np.random.default_rng(1)
    records = [encoded_records(rng, 150) for _ in range(LAYOUT.n_layers)]
    with new_archive(tmp_path / "a", block_tokens=block_tokens) as arc:
        append_in_chunks(arc, [r[:100] for r in records], rng)
        arc.commit({"ids": np.arange(100)}, {"n": 100})
        append_in_chunks(arc, [r[100:] for r in records], rng)
        assert_serves(arc, records)  # uncommitted appends are visible to the writer at once
        arc.commit({"ids": np.arange(150)}, {"n": 150})
    with Archive.open(tmp_path / "a", model_fingerprint=FINGERPRINT) as arc:
        assert (arc.n_tokens, arc.committed_tokens, arc.recovered) == (150, 150, None)
        assert_serves(arc, records)
        more = [encoded_records(rng, 40) for _ in range(LAYOUT.n_layers)]
        append_in_chunks(arc, more, rng)  # continues the unfinished last block
        arc.commit({"ids": np.arange(190)}, {"n": 190})
    with Archive.open(tmp_path / "a", writable=False) as arc:
        assert_serves(arc, [np.concatenate([a, b]) for a, b in zip(records, more)])
        assert arc.load_state()[1] == {"n": 190}


def test_ram_archive_serves_the_same_records_index_and_state_as_disk(tmp_path):
    rng = np.random.default_rng(2)
    records = [encoded_records(rng, 90) for _ in range(LAYOUT.n_layers)]
    state = ({"hot": rng.standard_normal((3, 4)).astype(np.float16)}, {"window": 64})
    ram = new_archive(None, mode="ram")
    append_in_chunks(ram, records, rng)
    ram.commit(*state)
    assert list(tmp_path.iterdir()) == []
    assert (ram.mode, ram.path, ram.n_tokens, ram.committed_tokens) == ("ram", None, 90, 90)
    assert_serves(ram, records)
    arrays, meta = ram.load_state()
    np.testing.assert_array_equal(arrays["hot"], state[0]["hot"])
    assert meta == {"window": 64}
    with pytest.raises(ValueError):
        ram.records(0)[0, 0, 0] = 1


def test_records_are_a_read_only_memory_map_that_is_remapped_only_when_the_file_grows(tmp_path):
    rng = np.random.default_rng(3)
    with new_archive(tmp_path / "a") as arc:
        arc.append(0, random_records(rng, 10))
        first = arc.records(0)
        assert isinstance(mapping_of(first), mmap.mmap), "records() is not backed by a memory map"
        assert not first.flags.writeable
        arc.append(0, random_records(rng, 1))
        second = arc.records(0)
        assert second.shape[0] == 11
        assert np.shares_memory(first, second), "a one-token append re-mapped (or copied) the shard"
        remaps, seen = 0, mapping_of(second)
        for _ in range(3000):  # 3000 single-token steps: the mapping must grow in a few big steps
            arc.append(0, random_records(rng, 1))
            view = arc.records(0)
            remaps += mapping_of(view) is not seen
            seen = mapping_of(view)
        assert remaps <= 8
        np.testing.assert_array_equal(first, arc.records(0)[:10])  # old views stay valid after re-mapping


def test_signature_index_is_contiguous_and_grows_by_doubling_not_per_append(tmp_path):
    rng = np.random.default_rng(4)
    with new_archive(tmp_path / "a") as arc:
        buffers = set()
        for _ in range(2000):
            arc.append(1, random_records(rng, 1))
            sigs = arc.signatures(1)
            assert sigs.flags.c_contiguous
            buffers.add(id(sigs.base))
        assert arc.signatures(1).shape == (2000, 2, HEAD_DIM // 8)
        assert len(buffers) <= 8, f"the signature index was reallocated {len(buffers)} times in 2000 appends"


def test_resident_index_is_at_most_one_25th_of_the_fp16_kv_it_replaces():
    # head_dim 64: fp16 key + value = 256 bytes per (layer, kv-head, token); the index in RAM must be <= 10.24
    d = 64
    layout = Layout(n_layers=2, n_kv_heads=4, head_dim=d, record_bytes=codec.record_bytes(d))
    rng = np.random.default_rng(17)
    flat = codec.encode_records(rng.standard_normal((100 * 4, d)), rng.standard_normal((100 * 4, d)))
    arc = new_archive(None, layout, mode="ram")
    for layer in range(layout.n_layers):
        arc.append(layer, flat.reshape(100, 4, -1))
    for layer in range(layout.n_layers):
        sigs, weights = arc.signatures(layer), arc.key_weights(layer)
        assert weights.dtype == np.float16 and weights.shape == (100, 4)
        per_record = (sigs.nbytes + weights.nbytes) / (100 * 4)
        assert per_record == 10 and per_record <= 2 * d * 2 / 25


def test_state_round_trips_dtypes_shapes_and_meta_and_is_empty_before_the_first_commit(tmp_path):
    state = {
        "token_ids": np.arange(7, dtype=np.int64),
        "hot_k": np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float16),
        "mask": np.array([True, False]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 5), dtype=np.uint8),
        "strided": np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],
        "big_endian": np.arange(3, dtype=">f4"),
    }
    meta = {"config": {"window": 512, "sinks": 4}, "text": "héllo", "layers": [1.5, None]}
    with Archive.create(tmp_path / "a", LAYOUT, FINGERPRINT) as arc:
        assert arc.load_state() == ({}, {})
        arc.commit(state, meta)
    with Archive.open(tmp_path / "a") as arc:
        arrays, got_meta = arc.load_state()
    assert got_meta == meta and set(arrays) == set(state)
    for name, value in state.items():
        assert arrays[name].shape == value.shape
        np.testing.assert_array_equal(arrays[name], value)


def test_only_the_latest_state_file_is_kept(tmp_path):
    with Archive.create(tmp_path / "a", LAYOUT, FINGERPRINT) as arc:
        for i in range(4):
            arc.commit({"i": np.array([i])}, {})
    assert sorted(p.name for p in (tmp_path / "a").glob("state-*")) == ["state-00000004.safetensors"]


# ------------------------------------------------------------------------------------------------ recovery


def test_writable_open_drops_the_uncommitted_tail_and_says_how_much(tmp_path):
    records = make_archive(tmp_path / "a", 100, 37)
    shard = tmp_path / "a" / shard_name(0)
    tail_size = shard.stat().st_size
    with Archive.open(tmp_path / "a", writable=False) as reader:  # a reader ignores the tail, touches nothing
        assert reader.committed_tokens == reader.n_tokens == 100
        assert "37" in reader.recovered
        assert_serves(reader, [r[:100] for r in records])
    assert shard.stat().st_size == tail_size
    with Archive.open(tmp_path / "a") as arc:
        assert arc.recovered == "recovered 100 committed tokens; dropped 37 uncommitted"
        assert_serves(arc, [r[:100] for r in records])
        assert arc.load_state()[1] == {"n": 100}
    assert shard.stat().st_size == HEADER_BYTES + 100 * LAYOUT.token_bytes
    with Archive.open(tmp_path / "a") as arc:
        assert arc.recovered is None


def test_block_checksum_mismatch_names_the_file_and_block(tmp_path):
    make_archive(tmp_path / "a", 100, block_tokens=16)
    shard = tmp_path / "a" / shard_name(2)
    offset = HEADER_BYTES + 37 * LAYOUT.token_bytes + 5  # token 37: block 2 (tokens 32-47)
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x40
    shard.write_bytes(bytes(data))
    for writable in (False, True):
        with pytest.raises(IKVError, match=r"checksum mismatch in .*layer-002\.ikv block 2 \(tokens 32-47\)"):
            Archive.open(tmp_path / "a", writable=writable)


# ------------------------------------------------------------------------------------------------ the codec's R and mu


def assert_codec(arc: Archive, rotation: np.ndarray, means: list) -> None:
    """The archive serves this rotation and these key means (None: not set), read-only and float32."""
    assert arc.rotation.dtype == np.float32 and not arc.rotation.flags.writeable
    np.testing.assert_array_equal(arc.rotation, rotation)
    for layer, mean in enumerate(means):
        if mean is None:
            assert arc.key_mean(layer) is None
            continue
        got = arc.key_mean(layer)
        assert got.dtype == np.float32 and got.shape == (LAYOUT.n_kv_heads, HEAD_DIM) and not got.flags.writeable
        np.testing.assert_array_equal(got, mean)


def test_rotation_and_key_means_survive_commit_reopen_ram_copy_and_pack(tmp_path):
    rotation = codec.rotation_matrix(HEAD_DIM, 7)  # not the default, so nothing can pass by falling back to it
    means = [key_mean(layer) for layer in range(LAYOUT.n_layers)]
    rng = np.random.default_rng(11)
    records = [encoded_records(rng, 40) for _ in range(LAYOUT.n_layers)]
    with Archive.create(tmp_path / "a", LAYOUT, FINGERPRINT, rotation=rotation, block_tokens=16) as arc:
        for layer, mean in enumerate(means):
            arc.set_key_mean(layer, mean.astype(np.float64))  # any float array; stored as float32
        assert_codec(arc, rotation, means)  # visible at once, like appended records
        append_in_chunks(arc, records, rng)
        arc.commit({"ids": np.arange(40)}, {})
    for writable in (True, False):
        with Archive.open(tmp_path / "a", writable=writable) as arc:
            assert_codec(arc, rotation, means)
            copy = arc.ram_copy()
            assert_codec(copy, rotation, means)
            assert_serves(copy, records)
    pack(tmp_path / "a", tmp_path / "a.zst")
    unpack(tmp_path / "a.zst", tmp_path / "b")
    with Archive.open(tmp_path / "b", writable=False) as arc:
        assert_codec(arc, rotation, means)
    assert inspect_archive(tmp_path / "b")["codec"] == {"rotation": [HEAD_DIM, HEAD_DIM],
                                                        "key_mean_set": [True] * LAYOUT.n_layers}


def test_a_key_mean_committed_before_its_layer_has_records_survives_and_the_default_rotation_is_seed_0(tmp_path):
    with Archive.create(tmp_path / "a", LAYOUT, FINGERPRINT) as arc:
        arc.set_key_mean(1, key_mean(1))
        arc.commit({}, {})
    with Archive.open(tmp_path / "a") as arc:
        assert_codec(arc, codec.rotation_matrix(HEAD_DIM, 0), [None, key_mean(1), None])
        assert arc.ram_copy().key_mean(0) is None
    assert inspect_archive(tmp_path / "a")["codec"]["key_mean_set"] == [False, True, False]


def test_append_before_set_key_mean_is_refused_naming_set_key_mean(tmp_path):
    for arc in (Archive.create(tmp_path / "a", LAYOUT, FINGERPRINT), Archive.create(None, LAYOUT, FINGERPRINT,
                                                                                   mode="ram")):
        with pytest.raises(ValueError, match=r"layer 2 has no key mean: call set_key_mean\(2, mu\)"):
            arc.append(2, random_records(np.random.default_rng(0), 3))
        assert arc.layer_tokens(2) == 0
        arc.set_key_mean(2, key_mean(2))
        arc.append(2, random_records(np.random.default_rng(0), 3))
        arc.close()


def test_a_set_key_mean_cannot_change_and_a_bad_one_is_refused(tmp_path):
    with new_archive(tmp_path / "a") as arc:
        arc.set_key_mean(0, key_mean(0).copy())  # the same value again: nothing happens
        with pytest.raises(ValueError, match="layer 0 already has another key mean"):
            arc.set_key_mean(0, key_mean(0) + 1e-3)
        arc.append(0, random_records(np.random.default_rng(0), 2))
        with pytest.raises(ValueError, match="already has another key mean"):
            arc.set_key_mean(0, key_mean(1))
        np.testing.assert_array_equal(arc.key_mean(0), key_mean(0))
        mean = key_mean(1)
        mean[1, 3] = np.nan
        for bad, needle in [(mean, "not finite"), (np.zeros((2, 8), np.float32), r"shape \[2, 8\]"),
                            (np.zeros((2, 16), np.int32), "float numpy array"),
                            ([[0.0] * 16] * 2, "float numpy array")]:
            with pytest.raises(ValueError, match=needle):
                arc.set_key_mean(1, bad)
        assert arc.key_mean(1) is not None  # new_archive set it; the refusals changed nothing
        with pytest.raises(ValueError):
            arc.set_key_mean(3, key_mean(0))
        writable_copy = arc.key_mean(0)
        with pytest.raises(ValueError):
            writable_copy[0, 0] = 1.0
    with Archive.open(tmp_path / "a", writable=False) as reader:
        with pytest.raises(ValueError, match="read-only"):
            reader.set_key_mean(0, key_mean(0))


@pytest.mark.parametrize("rotation, needle", [
    (np.eye(8, dtype=np.float32), r"shape \[8, 8\], head_dim 16 needs \[16, 16\]"),
    (2 * np.eye(HEAD_DIM, dtype=np.float32), "not orthogonal"),
    (np.full((HEAD_DIM, HEAD_DIM), np.inf, np.float32), "not finite"),
    (np.eye(HEAD_DIM, dtype=np.int64), "float numpy array"),
])
def test_create_refuses_a_rotation_that_is_not_an_orthogonal_head_dim_matrix(tmp_path, rotation, needle):
    with pytest.raises(ValueError, match=needle):
        Archive.create(tmp_path / "a", LAYOUT, FINGERPRINT, rotation=rotation)
    assert not (tmp_path / "a").exists()


def test_a_key_mean_set_after_the_last_commit_is_forgotten_with_it(tmp_path, monkeypatch):
    """Crash (kill -9) or a failed commit: a key mean set since the last commit goes the way of the records appended
    since; a layer whose key mean was committed keeps it."""
    path = tmp_path / "a"
    with Archive.create(path, LAYOUT, FINGERPRINT, block_tokens=8) as arc:
        arc.set_key_mean(0, key_mean(0))
        arc.commit({}, {})
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # a writer killed after it set layer 1's key mean and appended, before it committed
        try:
            arc = Archive.open(path)
            arc.set_key_mean(1, key_mean(1))
            arc.append(1, random_records(np.random.default_rng(0), 5))
            os.write(write_fd, b"ready")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(write_fd)
    assert os.read(read_fd, 5) == b"ready"
    os.close(read_fd)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with Archive.open(path) as arc:
        assert arc.key_mean(0) is not None and arc.key_mean(1) is None
        arc.set_key_mean(1, key_mean(2))  # free again: nothing was coded against the lost one
        arc.set_key_mean(2, key_mean(2))
        for layer in range(3):
            arc.append(layer, random_records(np.random.default_rng(layer), 4))
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(IKVError, match="back at its last commit"):
            arc.commit({}, {})
        monkeypatch.undo()
        assert_codec(arc, arc.rotation, [key_mean(0), None, None])
        assert arc.n_tokens == 0
    with Archive.open(path, writable=False) as arc:
        assert_codec(arc, arc.rotation, [key_mean(0), None, None])


# ------------------------------------------------------------------------------------------------ refusals


def test_open_refuses_another_models_archive_naming_both_fingerprints(tmp_path):
    make_archive(tmp_path / "a", 10)
    with pytest.raises(IKVError) as err:
        Archive.open(tmp_path / "a", model_fingerprint="llama-3.2-1b:fedcba9876543210")
    message = str(err.value)
    assert "another model" in message and "smollm2-135" in message and "llama-3.2-1" in message
    assert "\n" not in message
    Archive.open(tmp_path / "a", model_fingerprint=FINGERPRINT).close()  # and the refusal took no lock


def _reseal_manifest(path, edit):
    """Rewrite MANIFEST with edit(header_fields, body_dict) applied and a valid checksum."""
    raw = (path / MANIFEST_NAME).read_bytes()
    magic, version, reserved, _, _ = struct.unpack_from("<8sIIQQ", raw)
    body = json.loads(raw[32:])
    fields = {"version": version}
    edit(fields, body)
    data = json.dumps(body).encode()
    head = struct.pack("<8sIIQQ", magic, fields["version"], reserved, len(data), xxhash.xxh3_64_intdigest(data))
    (path / MANIFEST_NAME).write_bytes(head + data)


def test_open_refuses_a_newer_format_version_naming_both_versions(tmp_path):
    make_archive(tmp_path / "a", 10)
    _reseal_manifest(tmp_path / "a", lambda f, b: f.update(version=FORMAT_VERSION + 1))
    with pytest.raises(IKVError, match=rf"format version {FORMAT_VERSION + 1} .*format version {FORMAT_VERSION}"):
        Archive.open(tmp_path / "a")
    make_archive(tmp_path / "b", 10)
    _reseal_manifest(tmp_path / "b", lambda f, b: b.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(IKVError, match=rf"format version {FORMAT_VERSION + 1} .*upgrade"):
        Archive.open(tmp_path / "b")


def as_format_version_1(path) -> None:
    """Turn a closed archive into what format version 1 wrote: no rotation or key means, version 1 in MANIFEST and
    every shard header (each checksum made valid again)."""

    def strip(fields, body):
        fields["version"] = body["format_version"] = 1
        del body["rotation"]
        for shard in body["shards"]:
            del shard["key_mean"]

    _reseal_manifest(path, strip)
    for shard in path.glob("layer-*.ikv"):
        data = bytearray(shard.read_bytes())
        data[8:12] = struct.pack("<I", 1)
        shard.write_bytes(_resealed_header(data))


def _resealed_header(shard_bytes: bytearray) -> bytes:
    """A shard's bytes with its header checksum made valid again after an edit."""
    head = bytes(shard_bytes[: HEADER_BYTES - 8])
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + bytes(shard_bytes[HEADER_BYTES:])


def hand_pack(src, dst, format_version: int) -> None:
    """A pack of every file of `src` (MANIFEST first) as `ikv archive pack` lays it out, with no check on what they
    hold: how a pack of a version-1 archive looks."""
    import io
    import tarfile

    import zstandard

    names = [MANIFEST_NAME, *sorted(p.name for p in src.glob("layer-*.ikv")), *(p.name for p in src.glob("state-*"))]
    members = [(name, (src / name).read_bytes()) for name in names]
    index = {"pack_version": 1, "format_version": format_version, "committed_tokens": 10, "files": [
        {"name": name, "bytes": len(data), "xxh3": f"{xxhash.xxh3_64_intdigest(data):016x}"} for name, data in members]}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("IKVPACK.json", json.dumps(index).encode()), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dst.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw.getvalue()))


def test_a_format_version_1_archive_or_pack_is_refused_with_one_line_naming_both_versions_and_the_fix(tmp_path):
    from typer.testing import CliRunner

    from infinitekv.cli import app

    make_archive(tmp_path / "a", 10)
    as_format_version_1(tmp_path / "a")
    fix = "re-read the document into a new archive (or use the infinitekv release that wrote it)"
    expected = (f"manifest {tmp_path / 'a' / MANIFEST_NAME} has format version 1 but this InfiniteKV reads format "
                f"version {FORMAT_VERSION} only; {fix}")
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir()}
    for refused in (lambda: Archive.open(tmp_path / "a"), lambda: Archive.open(tmp_path / "a", writable=False),
                    lambda: inspect_archive(tmp_path / "a"), lambda: pack(tmp_path / "a", tmp_path / "a.zst")):
        with pytest.raises(IKVError) as err:
            refused()
        assert str(err.value) == expected
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "a").iterdir()} == before
    assert not (tmp_path / "a.zst").exists()
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "a")])
    assert result.exit_code == 2 and result.stderr == f"ikv: error: {expected}\n"
    for format_version, where in ((1, "pack"), (FORMAT_VERSION, "MANIFEST")):  # a v1 pack; a v1 MANIFEST in a v2 one
        hand_pack(tmp_path / "a", tmp_path / f"v{format_version}.zst", format_version)
        with pytest.raises(IKVError) as err:
            unpack(tmp_path / f"v{format_version}.zst", tmp_path / f"out{format_version}")
        message = str(err.value)
        assert "\n" not in message and message.endswith(f"has format version 1 but this InfiniteKV reads format "
                                                        f"version {FORMAT_VERSION} only; {fix}"), message
        assert message.split(" has ")[0].endswith(f"v{format_version}.zst" if where == "pack" else MANIFEST_NAME)
        assert not (tmp_path / f"out{format_version}").exists()


def test_a_version_1_shard_in_a_version_2_archive_is_refused_by_name_and_a_damaged_version_is_damage(tmp_path):
    make_archive(tmp_path / "a", 10)
    shard = tmp_path / "a" / shard_name(2)
    data = bytearray(shard.read_bytes())
    data[8:12] = struct.pack("<I", 1)
    shard.write_bytes(bytes(data))  # a flipped version byte: the header checksum no longer matches
    with pytest.raises(IKVError, match=r"layer-002\.ikv is corrupted \(header checksum mismatch\)"):
        Archive.open(tmp_path / "a")
    shard.write_bytes(_resealed_header(data))
    with pytest.raises(IKVError, match=rf"layer-002\.ikv has format version 1 but .* reads format version "
                                       rf"{FORMAT_VERSION} only; re-read the document"):
        Archive.open(tmp_path / "a")


def _set_key_mean_text(layer, text):
    return lambda f, b: b["shards"][layer].update(key_mean=text)


def _b64(values) -> str:
    return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode()


@pytest.mark.parametrize("edit, needle", [
    (_set_key_mean_text(1, "AAAA"), r"shards\[1\].key_mean is not base64 of 32 float32 values"),
    (_set_key_mean_text(1, "!" * 172), r"shards\[1\].key_mean is not valid base64"),
    (_set_key_mean_text(1, "A" * (8 << 20)), r"shards\[1\].key_mean is not base64 of 32 float32 values"),
    (_set_key_mean_text(1, "A" * 168 + "AA=="), r"shards\[1\].key_mean decodes to 127 bytes, not 128"),
    (_set_key_mean_text(1, [0.0] * 32), r"shards\[1\].key_mean is not base64"),
    (_set_key_mean_text(1, _b64([np.nan] + [0.0] * 31)), r"shards\[1\].key_mean holds values that are not finite"),
    (_set_key_mean_text(1, None), r"shards\[1\] holds records but no key_mean"),
    (lambda f, b: b["shards"][0].pop("key_mean"), r"'shards\[0\].key_mean' is missing"),
    (lambda f, b: b.pop("rotation"), "rotation is not base64 of 256 float32 values"),
    (lambda f, b: b.update(rotation=_b64(2 * np.eye(HEAD_DIM))), "rotation is not orthogonal"),
    (lambda f, b: b.update(rotation=_b64(np.eye(HEAD_DIM + 1))), "rotation is not base64 of 256"),
])
def test_a_manifest_with_a_hostile_rotation_or_key_mean_is_refused_with_one_line(tmp_path, edit, needle):
    make_archive(tmp_path / "a", 10)
    _reseal_manifest(tmp_path / "a", edit)  # a valid checksum: only the schema checks stand in the way
    for refused in (lambda: Archive.open(tmp_path / "a", writable=False), lambda: inspect_archive(tmp_path / "a")):
        with pytest.raises(IKVError, match=needle) as err:
            refused()
        assert str(err.value).startswith(f"manifest {tmp_path / 'a' / MANIFEST_NAME} is corrupted")
        assert "\n" not in str(err.value)


def test_open_refuses_a_shard_with_a_newer_format_version(tmp_path):
    make_archive(tmp_path / "a", 10)
    shard = tmp_path / "a" / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    shard.write_bytes(bytes(data))
    with pytest.raises(IKVError, match=rf"layer-001\.ikv has format version {FORMAT_VERSION + 1}"):
        Archive.open(tmp_path / "a")


def test_open_refuses_a_shard_from_another_archive(tmp_path):
    make_archive(tmp_path / "a", 20, seed=1)
    make_archive(tmp_path / "b", 20, seed=1)  # same layout, model and records: only the archive uuid differs
    (tmp_path / "a" / shard_name(1)).write_bytes((tmp_path / "b" / shard_name(1)).read_bytes())
    with pytest.raises(IKVError, match=r"layer-001\.ikv belongs to another archive"):
        Archive.open(tmp_path / "a", writable=False)


def test_open_refuses_a_shard_truncated_inside_the_committed_range(tmp_path):
    make_archive(tmp_path / "a", 50)
    shard = tmp_path / "a" / shard_name(0)
    os.truncate(shard, HEADER_BYTES + 30 * LAYOUT.token_bytes + 3)
    with pytest.raises(IKVError, match=r"layer-000\.ikv is truncated: it holds 30 of the 50 committed tokens"):
        Archive.open(tmp_path / "a")
    os.truncate(shard, 100)
    with pytest.raises(IKVError, match=r"layer-000\.ikv has a truncated header \(100 of 4096 bytes\)"):
        Archive.open(tmp_path / "a")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is empty, not an archive"),
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("hi")), "is not an InfiniteKV archive"),
        (lambda p: p.write_text("a file"), "is not a directory"),
        (lambda p: (p.mkdir(), (p / "LOCK").write_text(""), (p / "layer-000.ikv").write_bytes(b"x")),
         "creation was interrupted"),
    ],
    ids=["missing", "empty", "other-files", "a-file", "interrupted-create"],
)
def test_open_refuses_what_is_not_an_archive_with_one_clear_line(tmp_path, setup, message):
    path = tmp_path / "mem"
    setup(path)
    for writable in (True, False):
        with pytest.raises(IKVError, match=message) as err:
            Archive.open(path, writable=writable)
        assert "\n" not in str(err.value)
    assert not (path / "LOCK").exists() or message == "creation was interrupted"  # opening wrote nothing


def test_create_refuses_a_directory_holding_an_archive_or_other_files_but_takes_an_empty_one(tmp_path):
    make_archive(tmp_path / "a", 5)
    with pytest.raises(IKVError, match="already holds an archive"):
        Archive.create(tmp_path / "a", LAYOUT, FINGERPRINT)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "data.bin").write_bytes(b"keep me")
    with pytest.raises(IKVError, match="is not empty"):
        Archive.create(tmp_path / "b", LAYOUT, FINGERPRINT)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["data.bin"]
    (tmp_path / "c").mkdir()
    Archive.create(tmp_path / "c", LAYOUT, FINGERPRINT).close()
    with Archive.open(tmp_path / "c") as arc:
        assert arc.n_tokens == 0 and arc.meta == {}


def test_create_over_an_interrupted_create_starts_afresh(tmp_path):
    path = tmp_path / "a"
    path.mkdir()
    (path / "LOCK").write_text("123\n")
    (path / "layer-000.ikv").write_bytes(b"half a header")
    with new_archive(path) as arc:
        arc.append(0, random_records(np.random.default_rng(0), 1))
    assert sorted(p.name for p in path.iterdir()) == ["LOCK", "MANIFEST"] + [shard_name(i) for i in range(3)]


def test_bad_appends_and_uneven_commits_are_refused_without_changing_the_archive(tmp_path):
    rng = np.random.default_rng(6)
    with new_archive(tmp_path / "a") as arc:
        bad = [
            (0, random_records(rng, 2).astype(np.int8)),
            (0, random_records(rng, 2)[:, :1]),
            (0, random_records(rng, 2).reshape(2, -1)),
            (3, random_records(rng, 2)),
            (-1, random_records(rng, 2)),
            (0, [[1, 2]]),
        ]
        for layer, records in bad:
            with pytest.raises(ValueError):
                arc.append(layer, records)
        arc.append(0, random_records(rng, 2))
        with pytest.raises(ValueError, match="same token count"):
            arc.commit({}, {})
        with pytest.raises(ValueError):
            arc.commit({"x": [1, 2]}, {})
        for layer in (1, 2):
            arc.append(layer, random_records(rng, 2))
        with pytest.raises(ValueError, match="JSON"):
            arc.commit({}, {"f": object()})
        assert arc.committed_tokens == 0
        arc.commit({}, {})
        assert arc.committed_tokens == 2
    with Archive.open(tmp_path / "a", writable=False) as reader:
        with pytest.raises(ValueError, match="read-only"):
            reader.append(0, random_records(rng, 1))
        with pytest.raises(ValueError, match="read-only"):
            reader.commit({}, {})
    with pytest.raises(ValueError, match="record_bytes"):
        Layout(2, 2, 16, 104)


# ------------------------------------------------------------------------------------------------ tools


def test_inspect_reports_layout_tokens_bytes_and_integrity(tmp_path):
    make_archive(tmp_path / "a", 100, 9)
    info = inspect_archive(tmp_path / "a")
    assert info["format_version"] == FORMAT_VERSION
    assert info["model_fingerprint"] == FINGERPRINT
    assert info["layout"] == {"n_layers": 3, "n_kv_heads": 2, "head_dim": 16, "record_bytes": 32}
    assert info["committed_tokens"] == 100 and info["integrity"] == "ok"
    assert info["tiers"]["cold_records"] == 100 * 3 * LAYOUT.token_bytes
    assert info["tiers"]["hot_state"] > 800  # 100 int64 token ids
    assert "9" in info["recovered"] and info["meta"] == {"rope_theta": 1e4}
    assert info["codec"] == {"rotation": [16, 16], "key_mean_set": [True, True, True]}  # whether, not the floats
    assert set(info["files"]) >= {MANIFEST_NAME, shard_name(0), shard_name(2)}
    shard = tmp_path / "a" / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 3] ^= 1
    shard.write_bytes(bytes(data))
    assert "checksum mismatch" in inspect_archive(tmp_path / "a")["integrity"]


def test_pack_unpack_round_trip_carries_committed_data_only(tmp_path):
    records = make_archive(tmp_path / "a", 100, 23)
    info = pack(tmp_path / "a", tmp_path / "a.ikv.zst")
    assert info["committed_tokens"] == 100 and info["packed_bytes"] == (tmp_path / "a.ikv.zst").stat().st_size
    with pytest.raises(IKVError, match="already exists"):
        pack(tmp_path / "a", tmp_path / "a.ikv.zst")
    unpack(tmp_path / "a.ikv.zst", tmp_path / "b")
    with Archive.open(tmp_path / "b", model_fingerprint=FINGERPRINT) as arc:
        assert arc.recovered is None and arc.committed_tokens == 100
        assert_serves(arc, [r[:100] for r in records])
        np.testing.assert_array_equal(arc.load_state()[0]["token_ids"], np.arange(100))
        assert arc.meta == {"rope_theta": 1e4}
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("occupied")
    with pytest.raises(IKVError, match="not an empty directory"):
        unpack(tmp_path / "a.ikv.zst", tmp_path / "c")


def test_unpack_refuses_a_corrupted_or_truncated_pack_and_leaves_nothing_behind(tmp_path):
    make_archive(tmp_path / "a", 200, seed=7)
    pack(tmp_path / "a", tmp_path / "p.zst")
    good = (tmp_path / "p.zst").read_bytes()
    rng = np.random.default_rng(8)
    damaged = [good[: len(good) // 2], good[:100], good[:-1]]
    for offset in rng.integers(0, len(good), 12):
        data = bytearray(good)
        data[offset] ^= int(rng.integers(1, 256))
        damaged.append(bytes(data))
    for i, data in enumerate(damaged):
        (tmp_path / "bad.zst").write_bytes(data)
        with pytest.raises(IKVError, match=r"pack .*bad\.zst|checksum|corrupted"):
            unpack(tmp_path / "bad.zst", tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()


def test_unpack_refuses_a_pack_whose_member_was_swapped_even_with_valid_compression(tmp_path):
    import io
    import tarfile

    import zstandard

    make_archive(tmp_path / "a", 40)
    pack(tmp_path / "a", tmp_path / "p.zst")
    members = []
    with tarfile.open(fileobj=io.BytesIO(zstandard.ZstdDecompressor().decompressobj().decompress(
            (tmp_path / "p.zst").read_bytes()))) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for m, data in members:
            if m.name == shard_name(1):
                data = data[:-1] + bytes([data[-1] ^ 1])
            tar.addfile(m, io.BytesIO(data))
    (tmp_path / "q.zst").write_bytes(zstandard.ZstdCompressor().compress(out.getvalue()))
    with pytest.raises(IKVError, match=r"checksum mismatch in layer-001\.ikv"):
        unpack(tmp_path / "q.zst", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_cli_inspect_pack_unpack_print_summaries_and_fail_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from infinitekv.cli import app

    make_archive(tmp_path / "mem", 100, 9)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(tmp_path / "mem")])
    assert result.exit_code == 0, result.output
    assert "100 committed" in result.stdout and "ok: every checksum verified" in result.stdout
    result = runner.invoke(app, ["inspect", str(tmp_path / "mem"), "--json"])
    assert json.loads(result.stdout)["layout"]["n_layers"] == 3
    result = runner.invoke(app, ["archive", "pack", str(tmp_path / "mem"), str(tmp_path / "m.zst")])
    assert result.exit_code == 0 and "100 tokens" in result.stdout
    result = runner.invoke(app, ["archive", "unpack", str(tmp_path / "m.zst"), str(tmp_path / "copy")])
    assert result.exit_code == 0 and "checksums verified" in result.stdout
    for args in (["inspect", str(tmp_path / "nowhere")],
                 ["archive", "unpack", str(tmp_path / "m.zst"), str(tmp_path / "copy")],
                 ["archive", "pack", str(tmp_path / "nowhere"), str(tmp_path / "n.zst")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.startswith("ikv: error: ")
        assert result.stderr.count("\n") == 1, result.stderr
    shard = tmp_path / "mem" / shard_name(0)
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES] ^= 1
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(tmp_path / "mem")])
    assert result.exit_code == 2 and "FAILED" in result.stdout and "checksum mismatch" in result.stderr


def test_opening_an_archive_twice_for_writing_in_one_process_is_refused(tmp_path):
    make_archive(tmp_path / "a", 5)
    with Archive.open(tmp_path / "a"):
        for _ in range(2):  # the first refusal must not have released the holder's lock
            with pytest.raises(IKVError, match="already open for writing in this process"):
                Archive.open(tmp_path / "a")
        with Archive.open(tmp_path / "a", writable=False) as reader:
            assert reader.committed_tokens == 5
    Archive.open(tmp_path / "a").close()  # the refusal did not keep the lock

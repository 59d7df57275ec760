"""The archive's contract with the engine: what append/commit/open keep and serve, what they refuse, pack/unpack."""

from __future__ import annotations

import json
import mmap
import os
import struct

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

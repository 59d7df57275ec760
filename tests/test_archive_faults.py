"""The archive under faults: kill -9 mid-write, damaged bytes, full disks, read-only media, a second writer.

The promise under test: an archive reopens at its last commit with exactly the records and state of that commit, or
refuses with one IKVError line naming the file; never another exception, never wrong records.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import archive_writer as writer
from infinitekv import codec
from infinitekv.archive import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MANIFEST_NAME,
    Archive,
    _header_bytes,
    _manifest_from_json,
    _parse_header,
    _parse_manifest,
    shard_name,
)
from infinitekv.errors import IKVError

LAYOUT = writer.LAYOUT


def assert_holds_exactly(arc: Archive, n: int) -> None:
    """The archive is at a committed point n: the writer's records for [0, n), its key means (which records need)
    and rotation, and its state for n."""
    assert arc.committed_tokens == arc.n_tokens == n
    np.testing.assert_array_equal(arc.rotation, codec.rotation_matrix(LAYOUT.head_dim, 0))
    for layer in range(LAYOUT.n_layers):
        if n:
            np.testing.assert_array_equal(arc.key_mean(layer), writer.expected_key_mean(layer))
        expected = writer.expected_records(layer, 0, n)
        np.testing.assert_array_equal(arc.records(layer), expected)
        np.testing.assert_array_equal(arc.signatures(layer), codec.signatures_from_records(expected, LAYOUT.head_dim))
    arrays, meta = arc.load_state()
    want_arrays, want_meta = writer.expected_state(n) if n else ({}, {})
    assert meta == want_meta and set(arrays) == set(want_arrays)
    for name, value in want_arrays.items():
        np.testing.assert_array_equal(arrays[name], value)


def write_archive(path: Path, committed: int, tail: int, commits: int = 3) -> None:
    """A closed archive written by the test writer's rules: `committed` tokens over `commits` commits, then an
    uncommitted tail."""
    with writer.create_or_open(str(path)) as arc:
        bounds = np.linspace(0, committed, commits + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for layer in range(LAYOUT.n_layers):
                arc.append(layer, writer.expected_records(layer, lo, hi))
            arc.commit(*writer.expected_state(int(hi)))
        for layer in range(LAYOUT.n_layers):
            arc.append(layer, writer.expected_records(layer, committed, committed + tail))


# ------------------------------------------------------------------------------------------------ kill -9


def test_kill_9_at_random_points_never_loses_or_corrupts_committed_data(tmp_path):
    """60 writers killed with SIGKILL at random instants (mid-append, mid-fsync, mid-rename, mid-create): every
    reopen lands on a committed point at or after the last commit the writer reported, with exactly its data."""
    rng = np.random.default_rng(2024)
    trials, dropped_tails, path, floor = 60, 0, None, 0
    for trial in range(trials):
        if trial % 15 == 0:  # a fresh archive now and then, so some kills land inside create
            path, floor = tmp_path / f"mem{trial}", 0
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: a real Archive in its own process, until the kill
            try:
                os.close(read_fd)
                writer.write_until_killed(str(path), seed=trial, report_fd=write_fd)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write_fd)
        time.sleep(float(rng.uniform(0.0, 0.06)))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the writer died before it was killed"
        with os.fdopen(read_fd, "rb") as reports:
            lines = reports.read().decode().split("\n")[:-1]  # only complete lines
        reported = int(lines[-1]) if lines else floor
        if not (path / MANIFEST_NAME).exists():  # killed inside create: nothing was ever committed
            assert reported == 0
            with pytest.raises(IKVError, match="creation was interrupted|is empty|does not exist"):
                Archive.open(path)
            continue
        with Archive.open(path, model_fingerprint=writer.FINGERPRINT) as arc:
            assert arc.committed_tokens >= max(reported, floor), "a commit the writer saw complete was lost"
            assert_holds_exactly(arc, arc.committed_tokens)
            floor = arc.committed_tokens
            dropped_tails += arc.recovered is not None
    assert dropped_tails >= 5, "too few kills landed mid-append for this test to mean much"


# ------------------------------------------------------------------------------------------------ damage


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """An archive with 100 committed tokens (blocks of 16) and a 29-token uncommitted tail."""
    path = tmp_path_factory.mktemp("pristine") / "mem"
    write_archive(path, 100, 29)
    return path


def _damage_sites(pristine: Path, rng: np.random.Generator, n: int):
    """n (file, offset) pairs spread over the headers, committed blocks, tails, manifest and state."""
    files = sorted(p.name for p in pristine.iterdir() if p.name != "LOCK")
    sites = []
    for i in range(n):
        name = files[i % len(files)]
        size = (pristine / name).stat().st_size
        if name.endswith(".ikv") and i % 3 == 0:
            offset = int(rng.integers(0, HEADER_BYTES))  # a third of the shard hits go to the header
        else:
            offset = int(rng.integers(0, size))
        sites.append((name, offset))
    return sites


def _in_uncommitted_tail(name: str, offset: int) -> bool:
    return name.endswith(".ikv") and offset >= HEADER_BYTES + 100 * LAYOUT.token_bytes


def _open_both_ways(path: Path):
    """Open read-only, then writable; returns the committed count, or the IKVError message."""
    results = []
    for writable in (False, True):
        try:
            with Archive.open(path, writable=writable) as arc:
                assert_holds_exactly(arc, arc.committed_tokens)
                results.append(arc.committed_tokens)
        except IKVError as err:
            assert "\n" not in str(err)
            results.append(str(err))
    return results


def test_flipped_bytes_are_detected_naming_the_file_or_lie_in_the_uncommitted_tail(pristine, tmp_path):
    rng = np.random.default_rng(7)
    for trial, (name, offset) in enumerate(_damage_sites(pristine, rng, 120)):
        path = tmp_path / f"t{trial}"
        shutil.copytree(pristine, path)
        data = bytearray((path / name).read_bytes())
        data[offset] ^= int(rng.integers(1, 256))
        (path / name).write_bytes(bytes(data))
        results = _open_both_ways(path)
        if _in_uncommitted_tail(name, offset):
            assert results == [100, 100], (name, offset, results)
        else:
            for result in results:
                assert isinstance(result, str) and name in result, (name, offset, result)
        shutil.rmtree(path)


def test_truncation_at_random_offsets_is_detected_or_recovered_to_the_last_commit(pristine, tmp_path):
    rng = np.random.default_rng(8)
    for trial, (name, offset) in enumerate(_damage_sites(pristine, rng, 60)):
        path = tmp_path / f"t{trial}"
        shutil.copytree(pristine, path)
        os.truncate(path / name, offset)
        results = _open_both_ways(path)
        if _in_uncommitted_tail(name, offset):
            assert results == [100, 100], (name, offset, results)
        else:
            for result in results:
                assert isinstance(result, str) and name in result, (name, offset, result)
        shutil.rmtree(path)


def test_missing_shard_or_state_file_is_refused_by_name(pristine, tmp_path):
    for victim in (shard_name(1), "state-00000003.safetensors"):
        path = tmp_path / victim
        shutil.copytree(pristine, path)
        (path / victim).unlink()
        with pytest.raises(IKVError, match=f"missing its .*{victim}"):
            Archive.open(path, writable=False)


# ------------------------------------------------------------------------------------------------ parser fuzz


def _valid_manifest(pristine: Path) -> bytes:
    return (pristine / MANIFEST_NAME).read_bytes()


def _reseal(body: bytes) -> bytes:
    return struct.pack("<8sIIQQ", b"IKVMANIF", FORMAT_VERSION, 0, len(body), xxhash.xxh3_64_intdigest(body)) + body


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _parses_or_refuses(parse, raw: bytes):
    try:
        return parse(raw, "fuzzed")
    except IKVError as err:
        assert "\n" not in str(err) and str(err).startswith("fuzzed")
        return None


@FUZZ
@given(st.binary(max_size=300))
def test_manifest_parser_refuses_arbitrary_bytes_with_ikverror(raw):
    for candidate in (raw, b"IKVMANIF" + raw, _reseal(raw)):
        assert _parses_or_refuses(_parse_manifest, candidate) is None


@FUZZ
@given(data=st.data())
def test_manifest_parser_handles_every_single_byte_change_even_with_a_valid_checksum(pristine, data):
    raw = bytearray(_valid_manifest(pristine))
    offset = data.draw(st.integers(0, len(raw) - 1))
    raw[offset] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[offset]))
    assert _parses_or_refuses(_parse_manifest, bytes(raw)) is None  # the checksum catches it
    resealed = _parses_or_refuses(_parse_manifest, _reseal(bytes(raw[32:])))  # past the checksum: the schema
    if resealed is not None:
        assert len(resealed.block_sums) == resealed.layout.n_layers


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(data=st.data())
def test_manifest_schema_refuses_any_field_replaced_by_any_json_value(pristine, data):
    body = json.loads(_valid_manifest(pristine)[32:])
    key = data.draw(st.sampled_from(sorted(body) + ["layout.head_dim", "shards.0", "state.bytes", "state.file"]))
    target, leaf = body, key
    if "." in key:
        head, leaf = key.split(".")
        target = body[head]
        leaf = int(leaf) if isinstance(target, list) else leaf
    target[leaf] = data.draw(_JSON)
    try:
        manifest = _manifest_from_json(body, "fuzzed")
    except IKVError:
        return
    assert len(manifest.block_sums) == manifest.layout.n_layers
    assert all(len(s) == -(-manifest.committed_tokens // manifest.block_tokens) for s in manifest.block_sums)


@FUZZ
@given(st.binary(max_size=HEADER_BYTES + 10), st.data())
def test_shard_header_parser_refuses_damage_with_ikverror(raw, data):
    assert _parses_or_refuses(_parse_header, raw) is None
    header = bytearray(_header_bytes(LAYOUT, "ab" * 16, 2, 16, "fp"))
    offset = data.draw(st.integers(0, HEADER_BYTES - 9))
    header[offset] ^= data.draw(st.integers(1, 255))
    assert _parses_or_refuses(_parse_header, bytes(header)) is None
    resealed = bytes(header[:-8]) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(header[:-8])))
    _parses_or_refuses(_parse_header, resealed)  # any outcome but a non-IKVError exception


# ------------------------------------------------------------------------------------------------ full disk


class DiskFills:
    """Stands in for os.pwrite: writes up to `budget` more bytes (a short write at the edge), then ENOSPC."""

    def __init__(self, budget: int):
        self.left, self.real = budget, os.pwrite

    def __call__(self, fd, data, offset):
        if self.left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = memoryview(data).cast("B")[: self.left]
        written = self.real(fd, view, offset)
        self.left -= written
        return written


@pytest.mark.parametrize("budget", [0, 50, 1000, 5000])
def test_disk_full_while_appending_says_so_and_keeps_the_last_commit(tmp_path, monkeypatch, budget):
    write_archive(tmp_path / "mem", 40, 0)
    arc = writer.create_or_open(str(tmp_path / "mem"))
    monkeypatch.setattr(os, "pwrite", DiskFills(budget))
    with pytest.raises(IKVError, match="disk full") as err:
        n = 40
        while True:
            for layer in range(LAYOUT.n_layers):
                arc.append(layer, writer.expected_records(layer, n, n + 7))
            n += 7
    assert "back at its last commit, 40 tokens" in str(err.value)
    assert arc.n_tokens == arc.committed_tokens == 40
    assert_holds_exactly(arc, 40)
    monkeypatch.undo()  # space freed: the same archive object carries on
    for layer in range(LAYOUT.n_layers):
        arc.append(layer, writer.expected_records(layer, 40, 47))
    arc.commit(*writer.expected_state(47))
    arc.close()
    with Archive.open(tmp_path / "mem") as arc:
        assert_holds_exactly(arc, 47)


def _failing_call(target: str, at: int, counter: list):
    real = getattr(os, target)

    def call(*args):
        counter[0] += 1
        if counter[0] == at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    return call


@pytest.mark.parametrize("target", ["pwrite", "fsync", "fdatasync", "replace"])
def test_disk_full_at_any_step_of_a_commit_keeps_the_last_commit(tmp_path, monkeypatch, target):
    """Fail the 1st, 2nd, ... call of one system call inside commit(); each time the archive must stay at (or,
    once the manifest is renamed into place, move to) a commit, on disk and in memory."""
    for at in range(1, 8):
        path = tmp_path / f"{target}{at}"
        write_archive(path, 30, 0)
        arc = writer.create_or_open(str(path))
        for layer in range(LAYOUT.n_layers):
            arc.append(layer, writer.expected_records(layer, 30, 52))
        counter = [0]
        monkeypatch.setattr(os, target, _failing_call(target, at, counter))
        try:
            arc.commit(*writer.expected_state(52))
            failed = None
        except IKVError as err:
            failed = str(err)
        monkeypatch.undo()
        if failed is None:
            assert counter[0] < at  # commit made fewer such calls than `at`: nothing failed
            expected = 52
        elif "in place" in failed:  # only the directory fsync after the rename failed
            expected = 52
        else:
            assert "disk full" in failed and "back at its last commit, 30 tokens" in failed
            expected = 30
        assert arc.committed_tokens == arc.n_tokens == expected
        arc.close()
        with Archive.open(path) as arc:
            assert_holds_exactly(arc, expected)
        leftovers = sorted(p.name for p in path.iterdir() if not p.name.startswith("layer-"))
        assert leftovers == ["LOCK", MANIFEST_NAME, f"state-{arc.generation:08d}.safetensors"]
        if failed is None:
            break


# ------------------------------------------------------------------------------------------------ read-only media


def test_read_only_media_gives_a_clear_line_for_create_and_writable_open_but_reads_still_work(tmp_path, monkeypatch):
    write_archive(tmp_path / "mem", 20, 0)
    real_open, real_mkdir = os.open, os.mkdir

    def read_only_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def read_only_mkdir(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "open", read_only_open)
    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    with pytest.raises(IKVError, match="read-only media") as err:
        Archive.create(tmp_path / "new", LAYOUT, writer.FINGERPRINT)
    assert "writable directory" in str(err.value)
    with pytest.raises(IKVError, match="read-only media.*open the archive read-only"):
        Archive.open(tmp_path / "mem")
    with Archive.open(tmp_path / "mem", writable=False) as arc:
        assert_holds_exactly(arc, 20)


def test_permission_denied_while_appending_is_reported_and_rolled_back(tmp_path, monkeypatch):
    write_archive(tmp_path / "mem", 20, 0)
    arc = writer.create_or_open(str(tmp_path / "mem"))

    def denied(*args):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "pwrite", denied)
    with pytest.raises(IKVError, match="no permission"):
        arc.append(0, writer.expected_records(0, 20, 21))
    assert arc.n_tokens == 20
    arc.close()


# ------------------------------------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_naming_the_holders_pid_while_readers_are_allowed(tmp_path):
    write_archive(tmp_path / "mem", 20, 0)
    holder = subprocess.Popen(
        [sys.executable, str(Path(writer.__file__)), "hold", str(tmp_path / "mem")],
        stdout=subprocess.PIPE, text=True, cwd=Path(writer.__file__).parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(IKVError) as err:
            Archive.open(tmp_path / "mem")
        assert str(err.value) == (
            f"archive {tmp_path / 'mem'} is in use by another process (pid {holder.pid}); "
            "stop that process first, or open the archive read-only"
        )
        with Archive.open(tmp_path / "mem", writable=False) as reader:
            assert_holds_exactly(reader, 20)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with Archive.open(tmp_path / "mem") as arc:  # the kernel released the dead holder's lock
        assert_holds_exactly(arc, 20)

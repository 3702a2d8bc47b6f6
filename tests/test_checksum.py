"""kimi_trt.checksum against the hash libraries themselves, and the manifest conventions."""

from __future__ import annotations

import hashlib

import pytest
import xxhash

from kimi_trt.checksum import (
    ALGORITHM,
    READ_CHUNK,
    file_matches,
    hash_file,
    manifest_algorithm,
    new_hasher,
)
from kimi_trt.errors import CheckpointError


@pytest.fixture
def blob(tmp_path):
    data = bytes(range(256)) * ((2 * READ_CHUNK + 777) // 256)  # several reads, odd tail
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


def test_hash_file_matches_the_libraries(blob):
    path, data = blob
    assert ALGORITHM == "xxh3_128"
    assert hash_file(path) == xxhash.xxh3_128(data).hexdigest()
    assert hash_file(path, "sha256") == hashlib.sha256(data).hexdigest()


def test_file_matches_checks_size_then_digest(blob, tmp_path):
    path, data = blob
    entry = {"bytes": len(data), ALGORITHM: xxhash.xxh3_128(data).hexdigest()}
    assert file_matches(path, entry, ALGORITHM)
    assert not file_matches(path, {**entry, "bytes": len(data) + 1}, ALGORITHM)
    assert not file_matches(path, {"bytes": len(data), "sha256": "0" * 64}, ALGORITHM)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    assert not file_matches(path, entry, ALGORITHM)
    assert not file_matches(tmp_path / "absent", entry, ALGORITHM)


def test_manifest_algorithm_and_unknown_algorithm():
    assert manifest_algorithm({"checksum_algorithm": "xxh3_128"}) == "xxh3_128"
    assert manifest_algorithm({}) == "sha256"  # manifests from before the field
    with pytest.raises(CheckpointError, match="unknown checksum algorithm 'md4'"):
        new_hasher("md4")

"""File digests: the threaded hashing used for cache shards and dataset content equals hashlib's."""

import hashlib
import os

from sak.digest import sha256_files, sha256_of


def test_threaded_digests_are_hashlibs_in_the_given_order(tmp_path):
    paths = []
    for i, size in enumerate([0, 1, 2047, 2048, 5 << 20, 3]):  # empty, below / at the GIL threshold, > one chunk
        path = tmp_path / f"f{i}"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    expected = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert [sha256_of(p) for p in paths] == expected
    assert sha256_files(paths, threads=4) == expected
    assert sha256_files(paths[::-1], threads=3) == expected[::-1]
    assert sha256_files(paths, threads=1) == expected and sha256_files([]) == []

"""The preprocessed caches' one reader and writer (mamlkit.data.caches): round trip, and ``None`` (rebuild)
for a missing, stale, corrupt or truncated file; the digest is the sha256 of the values' bytes, as the
caches already on disk recorded it."""

import hashlib

import numpy as np
import torch
from safetensors.torch import save_file

from mamlkit.data.caches import read_cache, tensor_digest, write_cache


def values(dtype=torch.uint8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 2, 5, 5), generator=g).to(dtype)


def test_digest_is_the_sha256_of_the_bytes_in_c_order():
    for t in (values(), values(torch.float16), values(torch.float32), values().permute(0, 1, 3, 2)):
        assert tensor_digest(t) == hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    assert tensor_digest(values().numpy()) == tensor_digest(values())
    assert tensor_digest(values()) != tensor_digest(values().flip(0))


def test_round_trip_and_every_bad_file_reads_as_none(tmp_path):
    path, t = tmp_path / "sub" / "c.safetensors", values()
    write_cache(path, "images", t, {"source": "abc"}, digest_key="pixels_sha256")
    meta, got = read_cache(path, "images", digest_key="pixels_sha256")
    assert torch.equal(got, t) and meta == {"source": "abc", "pixels_sha256": tensor_digest(t)}
    assert read_cache(tmp_path / "missing.safetensors", "images", digest_key="pixels_sha256") is None
    stale = read_cache(path, "images", digest_key="pixels_sha256", valid=lambda m, v: m["source"] == "xyz")
    raises = read_cache(path, "images", digest_key="pixels_sha256", valid=lambda m, v: m["no such key"] == 1)
    assert stale is None and raises is None
    assert read_cache(path, "values", digest_key="pixels_sha256") is None  # no such tensor
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one pixel changed on disk: same header, another digest
    path.write_bytes(bytes(raw))
    assert read_cache(path, "images", digest_key="pixels_sha256") is None
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # cut short
    assert read_cache(path, "images", digest_key="pixels_sha256") is None


def test_caches_written_before_the_shared_helper_still_read(tmp_path):
    """The families' former inline digests (numpy bytes, memoryview, uint8 view) match tensor_digest, so
    the caches already on users' disks are not rebuilt."""
    t, path = values(torch.float16), tmp_path / "old.safetensors"
    old = hashlib.sha256(memoryview(np.ascontiguousarray(values().numpy())).cast("B")).hexdigest()
    assert old == tensor_digest(values())
    save_file({"values": t}, str(path), metadata={"values_sha256": hashlib.sha256(
        t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()})
    assert torch.equal(read_cache(path, "values", digest_key="values_sha256")[1], t)

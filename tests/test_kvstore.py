"""Chunk KV through LMCache's real tiers: keys, checks, corruption, restarts, Redis."""

import os
import subprocess
import sys
import textwrap
import time

import torch

from fastctx.cacheblend.params import BlendParams
from fastctx.kvstore.keys import KVFormat, chunk_key
from fastctx.kvstore.store import ChunkStore, decode, encode
from tests.conftest import wait_for

FMT = KVFormat("f" * 32, "float32", 3, 2, 8)


def kv(tokens=20, seed=0, dtype=torch.float32):
    return torch.randn(3, 2, tokens, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_keys_cover_salt_model_dtype_and_tokens_not_position():
    ids = list(range(100, 140))
    k = chunk_key(FMT, ids, None)
    assert k == chunk_key(FMT, list(ids), None)
    assert len({k, chunk_key(FMT, ids, "tenant-a"), chunk_key(FMT, ids, "tenant-b"),
                chunk_key(KVFormat("e" * 32, "float32", 3, 2, 8), ids, None),
                chunk_key(KVFormat("f" * 32, "bfloat16", 3, 2, 8), ids, None),
                chunk_key(FMT, ids[:-1], None)}) == 6


def test_entry_checks_reject_every_damage():
    x = kv()
    key = chunk_key(FMT, range(20), None)
    e = encode(key, FMT, x)
    got, why = decode(e, key, FMT, 20)
    assert why == "" and torch.equal(got, x)
    flipped = e.clone()
    flipped[-5] ^= 0xFF
    assert decode(flipped, key, FMT, 20)[1] == "payload checksum mismatch"
    assert "expected" in decode(e[:-100], key, FMT, 20)[1]
    assert decode(e, chunk_key(FMT, range(20), "s"), FMT, 20)[1] == "entry belongs to another key"
    assert "another model" in decode(e, key, KVFormat("f" * 32, "bfloat16", 3, 2, 8), 20)[1]
    assert decode(torch.zeros(64, dtype=torch.uint8), key, FMT, 20)[1] == "not a fastctx chunk entry"
    garbage = e.clone()
    garbage[20:40] = 7
    assert decode(garbage, key, FMT, 20)[0] is None


def test_cpu_tier_round_trip_and_misses():
    store = ChunkStore(BlendParams(local_cpu_gb=0.05), FMT)
    try:
        key = chunk_key(FMT, range(20), None)
        assert store.get(key, 20) is None
        store.put(key, kv())
        assert torch.equal(store.get(key, 20), kv())
        assert store.get(chunk_key(FMT, range(20), "other salt"), 20) is None
        store.put(k2 := chunk_key(FMT, range(7), None), kv(7, dtype=torch.bfloat16))  # wrong dtype for FMT
        assert store.get(k2, 7) is None
    finally:
        store.close()


def test_disk_tier_survives_a_restart_and_a_corrupt_file_is_a_miss(tmp_path):
    disk = str(tmp_path / "disk")
    params = BlendParams(local_cpu_gb=0.05, local_disk=disk, local_disk_gb=0.1)
    keys = [chunk_key(FMT, range(i, i + 20), None) for i in range(3)]
    store = ChunkStore(params, FMT)
    for i, k in enumerate(keys):
        store.put(k, kv(seed=i))
    assert wait_for(lambda: len(os.listdir(disk)) == 3)
    store.close()
    files = sorted(os.path.join(disk, f) for f in os.listdir(disk))
    with open(files[0], "r+b") as f:  # flip bytes inside the payload
        f.seek(os.path.getsize(files[0]) - 50)
        f.write(os.urandom(16))
    os.truncate(files[1], os.path.getsize(files[1]) // 2)  # a torn write
    store = ChunkStore(params, FMT)  # a fresh store: it must find the files
    try:
        got = [store.get(k, 20) for k in keys]
        assert sum(g is None for g in got) == 2
        ok = [g for g in got if g is not None][0]
        assert any(torch.equal(ok, kv(seed=i)) for i in range(3))
    finally:
        store.close()


def test_killed_mid_write_leaves_a_readable_store(tmp_path):
    disk = str(tmp_path / "disk")
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fastctx.cacheblend.params import BlendParams
        from fastctx.kvstore.keys import KVFormat, chunk_key
        from fastctx.kvstore.store import ChunkStore
        fmt = KVFormat("f" * 32, "float32", 3, 2, 8)
        store = ChunkStore(BlendParams(local_cpu_gb=0.2, local_disk={disk!r}, local_disk_gb=1.0), fmt)
        for i in range(200):
            store.put(chunk_key(fmt, range(i, i + 2000), None), torch.randn(3, 2, 2000, 16))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script], timeout=120)
    assert os.listdir(disk)
    store = ChunkStore(BlendParams(local_cpu_gb=0.2, local_disk=disk, local_disk_gb=1.0), FMT)
    try:
        fmt = KVFormat("f" * 32, "float32", 3, 2, 8)
        got = [store.get(chunk_key(fmt, range(i, i + 2000), None), 2000) for i in range(200)]
        assert any(g is not None for g in got)  # what was written whole reads back; the rest is a miss
    finally:
        store.close()


def test_redis_tier_is_shared_corruption_is_a_miss_and_a_dead_redis_only_misses(redis_server):
    port, client, proc = redis_server
    params = BlendParams(local_cpu_gb=0.05, remote_url=f"redis://127.0.0.1:{port}")
    writer = ChunkStore(params, FMT)
    keys = [chunk_key(FMT, range(i, i + 20), None) for i in range(2)]
    for i, k in enumerate(keys):
        writer.put(k, kv(seed=i))
    assert wait_for(lambda: len([n for n in client.scan_iter() if n.endswith(b"kv_bytes")]) == 2)
    writer.close()
    # Damage one entry's bytes in Redis (same length, so LMCache itself notices nothing).
    name = sorted(n for n in client.scan_iter() if n.endswith(b"kv_bytes"))[0]
    raw = bytearray(client.get(name))
    raw[-40:-20] = os.urandom(20)
    client.set(name, bytes(raw))
    reader = ChunkStore(params, FMT)  # another process's view: only Redis holds the entries
    try:
        got = [reader.get(k, 20) for k in keys]
        assert sum(g is None for g in got) == 1
        assert any(g is not None and torch.equal(g, kv(seed=i)) for i, g in enumerate(got))
        proc.kill()
        proc.wait()
        k3 = chunk_key(FMT, range(50, 70), None)
        t = time.time()
        reader.put(k3, kv(seed=3))  # lost, not raised
        assert reader.get(chunk_key(FMT, range(80, 100), None), 20) is None
        assert time.time() - t < 30
    finally:
        reader.close()

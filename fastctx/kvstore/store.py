"""Chunk KV through LMCache's storage tiers (local CPU, local disk, a remote such as Redis).

LMCache's ``StorageManager`` does the storing: its tiers, eviction, async
writes, Redis client. What fastctx adds, because LMCache 0.5.6 lacks it
(measured; README lists the evidence):

- the entry format and its checks: each entry is one byte tensor, a header
  (magic, the full chunk key, the KV format, shape, dtype, a CRC32 of the
  payload) then the KV bytes. LMCache keeps no checksum: a bit-flipped or
  truncated disk file, or flipped bytes in Redis, come back as plausible
  numbers. Here they are a miss and a warning, and the bad copy is dropped;
- re-indexing the disk tier at start: LocalDiskBackend indexes files in
  memory only, so a restarted server would never see what it wrote;
- closing: ``StorageManager.close`` deadlocks when Redis is configured
  (RedisConnector awaits a blocking executor shutdown on its own loop), and
  its loop thread is not a daemon, so a process that never closes never exits.

A tier that fails (Redis down, disk full) is a miss or a lost write, never an
error in the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import zlib

import torch

from fastctx.kvstore.keys import KVFormat

os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")  # its INFO lines would drown the engine log

logger = logging.getLogger("vllm.fastctx.kvstore")

MAGIC = b"FCTXKV01"
_HEAD = 16  # magic + header length (uint64)
_ALIGN = 64
_MODEL = "fastctx-chunks"


def _format():
    """LMCache's layout tag for our flat byte entries: one whose token axis is the first (here: bytes),
    which its CPU tier reads when it evicts or clears."""
    from lmcache.v1.memory_management import MemoryFormat

    return MemoryFormat.KV_2TD


def encode(key: str, fmt: KVFormat, kv: torch.Tensor) -> torch.Tensor:
    """The entry bytes of chunk KV ``[layers, 2, tokens, width]``."""
    payload = kv.contiguous().view(torch.uint8).reshape(-1)
    header = json.dumps({"key": key, "format": fmt.tag(), "shape": list(kv.shape),
                         "dtype": str(kv.dtype).removeprefix("torch."),
                         "crc32": zlib.crc32(payload.numpy())}).encode()
    start = -(-(_HEAD + len(header)) // _ALIGN) * _ALIGN
    out = torch.zeros(start + payload.numel(), dtype=torch.uint8)
    out[:8] = torch.frombuffer(bytearray(MAGIC), dtype=torch.uint8)
    out[8:16] = torch.frombuffer(bytearray(len(header).to_bytes(8, "little")), dtype=torch.uint8)
    out[_HEAD:_HEAD + len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    out[start:] = payload
    return out


def decode(entry: torch.Tensor, key: str, fmt: KVFormat, tokens: int) -> tuple[torch.Tensor | None, str]:
    """The chunk KV in an entry, or None and why it is not usable."""
    raw = entry.reshape(-1)
    if raw.dtype != torch.uint8 or raw.numel() < _HEAD or bytes(raw[:8].tolist()) != MAGIC:
        return None, "not a fastctx chunk entry"
    hlen = int.from_bytes(bytes(raw[8:16].tolist()), "little")
    if hlen > raw.numel() - _HEAD:
        return None, "truncated header"
    try:
        header = json.loads(bytes(raw[_HEAD:_HEAD + hlen].numpy()).decode())
        shape, dtype = header["shape"], getattr(torch, header["dtype"])
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        return None, f"unreadable header ({exc})"
    if header.get("key") != key:
        return None, "entry belongs to another key"
    if (header.get("format") != fmt.tag() or header["dtype"] != fmt.dtype
            or shape != [fmt.layers, 2, tokens, fmt.kv_heads * fmt.head_dim]):
        return None, "entry has another model, dtype or KV layout"
    start = -(-(_HEAD + hlen) // _ALIGN) * _ALIGN
    size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    payload = raw[start:]
    if payload.numel() != size:
        return None, f"payload is {payload.numel()} bytes, expected {size}"
    if zlib.crc32(payload.numpy()) != header.get("crc32"):
        return None, "payload checksum mismatch"
    return payload.clone().view(dtype).view(shape), ""


class ChunkStore:
    """``get(key, tokens)`` / ``put(key, kv)`` of chunk KV over the tiers the params name."""

    def __init__(self, params, fmt: KVFormat):
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        self.fmt = fmt
        cfg = LMCacheEngineConfig.from_defaults(
            chunk_size=256,
            local_cpu=True,  # LMCache copies every hit from a lower tier into it, and only it evicts
            max_local_cpu_size=params.local_cpu_gb,
            local_disk=params.local_disk,
            max_local_disk_size=params.local_disk_gb if params.local_disk else 0.0,
            remote_url=params.remote_url,
            remote_serde="naive",
            save_unfull_chunk=False,
        )
        meta = LMCacheMetadata(model_name=_MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                               kv_dtype=torch.uint8, kv_shape=(1, 1, 256, 1, 1), role="worker", chunk_size=256)
        self._sm = StorageManager(cfg, meta, EventManager())
        if params.local_disk:
            self._reindex_disk()
        self._closed = False
        # Before interpreter shutdown joins threads: LMCache's loop thread would keep the process alive.
        threading._register_atexit(self.close)

    def _key(self, key: str):
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey(model_name=_MODEL, world_size=1, worker_id=0, chunk_hash=int(key[:16], 16),
                              dtype=torch.uint8)

    def get(self, key: str, tokens: int) -> torch.Tensor | None:
        try:
            obj = self._sm.get(self._key(key))
        except Exception as exc:  # a tier failing is a miss, not a failed request
            logger.warning("cacheblend store: get failed (%s: %s); recomputing the chunk", type(exc).__name__, exc)
            return None
        if obj is None:
            return None
        try:
            kv, why = decode(obj.tensor, key, self.fmt, tokens)
        finally:
            obj.ref_count_down()
        if kv is None:
            logger.warning("cacheblend store: entry %s unusable (%s); recomputing the chunk", key[:16], why)
            with contextlib.suppress(Exception):  # the CPU tier may hold a copy of a bad lower-tier entry
                self._sm.remove(self._key(key))
        return kv

    def put(self, key: str, kv: torch.Tensor) -> None:
        entry = encode(key, self.fmt, kv)
        try:
            obj = self._sm.allocate(entry.shape, entry.dtype, fmt=_format(), eviction=True, busy_loop=False)
            if obj is None:
                logger.warning("cacheblend store: no room for a %d MB entry; not stored", entry.numel() >> 20)
                return
            obj.tensor.copy_(entry)
            self._sm.batched_put([self._key(key)], [obj])
        except Exception as exc:
            logger.warning("cacheblend store: put failed (%s: %s); chunk not stored", type(exc).__name__, exc)

    def _reindex_disk(self) -> None:
        from lmcache.utils import CacheEngineKey

        disk = self._sm.storage_backends.get("LocalDiskBackend")
        if disk is None:
            return
        for name in sorted(os.listdir(disk.path)):
            if not (name.startswith(_MODEL + "@") and name.endswith(".pt")):
                continue
            size = os.path.getsize(os.path.join(disk.path, name))
            try:
                key = CacheEngineKey.from_string(name[:-3])
            except Exception:
                continue
            # Entries are flat byte tensors, so the file size is the shape; a torn file fails the checks on get.
            disk.insert_key(key, size, torch.Size([size]), key.dtype, _format())
            disk.current_cache_size += size
            disk.usage += size

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sm = self._sm
        remote = sm.storage_backends.get("RemoteBackend")
        conn = getattr(getattr(remote, "connection", None), "getWrappedConnector", lambda: None)()
        if conn is not None and hasattr(conn, "pq_executor"):  # Redis: tear it down by hand, then the rest
            sm.storage_backends.pop("RemoteBackend")
            for coro in (conn.pq_executor.shutdown_async(wait=False), conn.connection.aclose()):
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(coro, sm.loop).result(5)
        if sm.thread.is_alive():
            sm.close()

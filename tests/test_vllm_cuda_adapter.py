"""fastctx's vLLM CUDA adapter, checked on CPU tensors: vLLM's own metadata and cache-layout code, the
adapter's translation and its forward over a FlashAttention-layout cache (prefill through fastctx's core,
decodes on the sub-batch FlashAttention would get). FlashAttention's kernel itself is CUDA-only, so for
the decode sub-batch the reference attention runs over exactly the metadata the adapter hands it."""

import types

import pytest
import torch

# At collection, before anything imports vLLM: the Triton kernels load interpreted.
from tests.kernel_impls import run_triton  # noqa: F401

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 4, 2, 64, 16, 24
SCALE = DIM ** -0.5


def flash_cache(dtype):
    """One layer's FlashAttention cache as vLLM allocates it (``LBNHC``, second of two layers)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheTensor, create_kv_cache_views
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=DIM, dtype=dtype)
    page = spec.page_size_bytes
    raw = torch.zeros(2 * NUM_BLOCKS * page, dtype=torch.int8)
    return create_kv_cache_views(raw, spec, NUM_BLOCKS, KVCacheLayout.LBNHC,
                                 KVCacheTensor(size=raw.numel(), layers=["a", "b"], layer_stride=NUM_BLOCKS * page,
                                               block_stride=page))[1]


def step(dtype, query_lens, seq_lens, g):
    """A step as vLLM hands it to FlashAttention: the cache filled through FlashAttention's write views, the
    queries, and vLLM's ``CommonAttentionMetadata`` (host copies included)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    kv_cache = flash_cache(dtype)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(DIM, dim=-1)
    blocks_per = [-(-s // BLOCK) for s in seq_lens]
    order = torch.randperm(NUM_BLOCKS, generator=g).int()
    table = torch.zeros(len(seq_lens), max(blocks_per), dtype=torch.int32)
    used = 0
    for b, (n, s) in enumerate(zip(blocks_per, seq_lens)):
        table[b, :n] = order[used:used + n]
        used += n
        pos = torch.arange(s)
        rows = table[b].long()[pos // BLOCK]
        key_cache[rows, pos % BLOCK] = torch.randn(s, KV_HEADS, DIM, generator=g).to(dtype)
        value_cache[rows, pos % BLOCK] = torch.randn(s, KV_HEADS, DIM, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    tokens = int(qsl[-1])
    slots = torch.cat([table[b].long()[torch.arange(s - q, s) // BLOCK] * BLOCK + torch.arange(s - q, s) % BLOCK
                       for b, (q, s) in enumerate(zip(query_lens, seq_lens))])
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=lengths, num_reqs=len(seq_lens),
        num_actual_tokens=tokens, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        block_table_tensor=table, slot_mapping=slots, seq_lens_cpu_upper_bound=lengths.clone())
    query = torch.randn(tokens, HEADS, DIM, generator=g).to(dtype)
    return kv_cache, query, common


def flash_metadata(common, decode_threshold=1):
    """What the adapter's builder adds to FlashAttention's metadata for this step."""
    from fastctx.vllm_plugin.attention_cuda import FastctxFlashAttentionMetadata, host_layout

    meta = FastctxFlashAttentionMetadata(
        num_actual_tokens=common.num_actual_tokens, max_query_len=common.max_query_len,
        query_start_loc=common.query_start_loc, max_seq_len=common.max_seq_len, seq_lens=common.seq_lens,
        block_table=common.block_table_tensor, slot_mapping=common.slot_mapping)
    vars(meta).update(vars(host_layout(common, decode_threshold)))
    return meta


def test_host_layout_splits_decodes_from_vllm_host_copies(vllm_available):
    from fastctx.vllm_plugin.attention_cuda import host_layout

    g = torch.Generator().manual_seed(0)
    _, _, common = step(torch.float32, [1, 1, 3, 40], [20, 9, 33, 40], g)
    layout = host_layout(common, 1)
    assert (layout.num_decodes, layout.query_start_loc_host, layout.seq_lens_host) == (2, [0, 1, 2, 5, 45],
                                                                                       [20, 9, 33, 40])
    assert host_layout(common, 3).num_decodes == 3  # verifying 1 + 2 drafts counts as a decode
    # Without vLLM's host bound the lengths come from the device tensor once per step.
    assert host_layout(common.replace(seq_lens_cpu_upper_bound=None), 1).seq_lens_host == [20, 9, 33, 40]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_metadata_is_flash_attentions_decode_sub_batch(vllm_available, dtype):
    from fastctx.kernels.attention import Read, reference_paged_attention
    from fastctx.vllm_plugin.attention_cuda import decode_metadata
    from fastctx.vllm_plugin.paged_kv import cuda_paged_kv

    g = torch.Generator().manual_seed(1)
    kv_cache, query, common = step(dtype, [1, 3, 1, 50], [70, 17, 5, 90], g)
    meta = flash_metadata(common, decode_threshold=3)
    assert meta.num_decodes == 3
    sub = decode_metadata(meta)
    assert (sub.num_actual_tokens, sub.max_query_len, sub.max_seq_len) == (5, 3, 70)
    assert sub.query_start_loc.tolist() == [0, 1, 4, 5] and sub.seq_lens.tolist() == [70, 17, 5]
    assert torch.equal(sub.block_table, common.block_table_tensor[:3])
    assert torch.equal(sub.slot_mapping, common.slot_mapping[:5]) and sub.scheduler_metadata is None
    kv = cuda_paged_kv(kv_cache)
    whole = reference_paged_attention(query, kv, common.block_table_tensor, common.query_start_loc_cpu.tolist(),
                                      common.seq_lens.tolist(), [Read.DENSE] * 4, scale=SCALE)
    part = reference_paged_attention(query[:sub.num_actual_tokens], kv, sub.block_table, sub.query_start_loc.tolist(),
                                     sub.seq_lens.tolist(), [Read.DENSE] * 3, scale=SCALE)
    torch.testing.assert_close(part, whole[:5], atol=0, rtol=0)


def adapter_impl(section: dict):
    """The adapter's impl class as vLLM builds it (under the engine's config), FlashAttention's decode kernel
    stood in for by the reference over the sub-batch metadata the adapter hands it."""
    from vllm.config import AttentionConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from fastctx.core import AttentionRuntime
    from fastctx.kernels.attention import Read, reference_paged_attention
    from fastctx.methods import ModelShape
    from fastctx.vllm_plugin.attention_cuda import FastctxFlashAttentionImpl, decode_metadata
    from fastctx.vllm_plugin.paged_kv import cuda_paged_kv
    from tests.emulated_cuda import cpu_values, outside_emulation

    class FlashDecodesByReference(FastctxFlashAttentionImpl):
        decoded = 0

        def engine_decodes(self, layer, query, key, value, kv_cache, meta, output):
            sub = decode_metadata(meta)
            with outside_emulation():  # FlashAttention's own kernel is not what is checked
                query, kv_cache, output = cpu_values(query), cpu_values(kv_cache), cpu_values(output)
                block_table, qsl, seq_lens = map(cpu_values, (sub.block_table, sub.query_start_loc, sub.seq_lens))
                n = sub.num_actual_tokens
                output[:n] = reference_paged_attention(
                    query[:n], cuda_paged_kv(kv_cache), block_table, qsl.tolist(), seq_lens.tolist(),
                    [Read.DENSE] * seq_lens.numel(), scale=self.scale).view(n, -1)
            self.decoded += n

    config = VllmConfig(attention_config=AttentionConfig(backend=AttentionBackendEnum.CUSTOM),
                        additional_config={"fastctx": section})
    with set_current_vllm_config(config):
        impl = FlashDecodesByReference(num_heads=HEADS, head_size=DIM, scale=SCALE, num_kv_heads=KV_HEADS,
                                       alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    assert impl.fallback is None
    runtime = AttentionRuntime(impl.fastctx_config, ModelShape(num_layers=1, num_heads=HEADS, num_kv_heads=KV_HEADS,
                                                               head_dim=DIM))
    impl.bind(runtime, 0, "model.layers.0.self_attn.attn", lambda n: [f"req{i}" for i in range(n)])
    return impl, runtime


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("section,read", [
    ({"attention": "dense"}, None),
    ({"attention": "streaming", "streaming": {"sink": 4, "local": 24}}, (4, 24)),
], ids=["dense", "streaming"])
def test_adapter_forward_over_a_flash_attention_cache(vllm_available, dtype, section, read):
    """A mixed step (two decodes, a chunk after a cached prefix, a fresh prefill) through the adapter's
    forward: prefill rows are what fastctx's core reads (dense, or the method's window), decode rows are
    FlashAttention's over the decode sub-batch."""
    from fastctx.kernels.attention import Read, reference_paged_attention
    from fastctx.vllm_plugin.paged_kv import cuda_paged_kv

    impl, runtime = adapter_impl(section)
    g = torch.Generator().manual_seed(2)
    query_lens, seq_lens = [1, 1, 70, 80], [45, 12, 130, 80]
    kv_cache, query, common = step(dtype, query_lens, seq_lens, g)
    meta = flash_metadata(common)
    output = torch.full((query.shape[0], HEADS * DIM), float("nan"), dtype=dtype)
    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    impl.forward(layer, query, None, None, kv_cache, meta, output)
    prefill = Read.DENSE if read is None else Read.window(*read)
    want = reference_paged_attention(query, cuda_paged_kv(kv_cache), common.block_table_tensor,
                                     common.query_start_loc_cpu.tolist(), seq_lens,
                                     [Read.DENSE, Read.DENSE, prefill, prefill], scale=SCALE)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(output.view_as(want).float(), want.float(), atol=tol, rtol=tol)
    assert impl.decoded == 2
    density = runtime.density()
    assert density and (read is None) == all(d["density"] == 1.0 for d in density), density


def test_adapter_falls_back_to_flash_attention_where_it_cannot_translate(vllm_available):
    from fastctx.vllm_plugin.attention_cuda import why_not_batch

    impl, _ = adapter_impl({"attention": "dense"})
    impl.sliding_window = (127, 0)
    assert impl._why_not_layer() == "sliding window is not translated"
    g = torch.Generator().manual_seed(3)
    _, _, common = step(torch.float32, [1, 20], [30, 20], g)
    meta = flash_metadata(common)
    meta.causal = torch.ones(2, dtype=torch.int32)
    assert why_not_batch(meta) == "per-request or non-causal attention"


def test_cuda_refuses_what_runs_on_cpu_only(vllm_available):
    from vllm.config import AttentionConfig, KVTransferConfig, VllmConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from fastctx.vllm_plugin import register
    from fastctx.vllm_plugin.checks import cuda_problem, validate

    register()  # the connector's name, as vLLM's plugin loading registers it
    custom = AttentionConfig(backend=AttentionBackendEnum.CUSTOM)
    dense = VllmConfig(attention_config=custom, additional_config={"fastctx": {"attention": "dense"}})
    assert cuda_problem(dense, validate(dense)) is None
    blend = VllmConfig(attention_config=custom, kv_transfer_config=KVTransferConfig(
        kv_connector="FastctxBlendConnector", kv_role="kv_both"))
    assert "CPU engine only" in cuda_problem(blend, validate(blend))


def _two_kv_heads_scores(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text('{"scores": [[0.2, 0.8]]}')  # KV head 0 streaming, KV head 1 dense
    return str(path)


EMULATED_SECTIONS = {
    "dense": lambda tmp: {"attention": "dense"},
    "streaming": lambda tmp: {"attention": "streaming", "decode": "streaming", "streaming": {"sink": 4, "local": 24}},
    "minference": lambda tmp: {"attention": "minference", "dense_below": 0,
                               "minference": {"v_size": 8, "s_size": 12, "block_size": 16, "last_q": 16}},
    "flexprefill": lambda tmp: {"attention": "flexprefill", "dense_below": 0,
                                "flexprefill": {"gamma": 0.5, "min_budget": 16, "block_size": 32}},
    "lserve": lambda tmp: {"attention": "lserve", "decode": "lserve", "dense_below": 0,
                           "lserve": {"head_scores": _two_kv_heads_scores(tmp), "token_budget": 32, "page_size": 16,
                                      "prefill_sink": 4, "prefill_local": 32, "decode_sink": 4, "decode_local": 16}},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", list(EMULATED_SECTIONS))
def test_adapter_on_emulated_cuda_makes_no_host_round_trip(vllm_available, tmp_path, monkeypatch, dtype, method):
    """The adapter's forward with every tensor vLLM hands it on (emulated) CUDA: the same outputs as on
    CPU tensors, its methods' estimates and indexes built without one host read of a device value (the
    emulator counts them) and without mixing devices; the Triton kernels run interpreted."""
    from fastctx.kernels import paged_triton, sparse_triton
    from tests import kernel_impls
    from tests.emulated_cuda import cpu_values, emulated_cuda, launch_on_cpu, to_cuda

    for module, name in ((paged_triton, "_paged_kernel"), (sparse_triton, "_sparse_prefill_kernel"),
                         (sparse_triton, "_last_query_sums_kernel")):
        monkeypatch.setattr(module, name, launch_on_cpu(getattr(module, name), kernel_impls._interpreted))
    section = EMULATED_SECTIONS[method](tmp_path)
    g = torch.Generator().manual_seed(4)
    query_lens, seq_lens = [1, 1, 70, 96], [45, 12, 130, 96]
    kv_cache, query, common = step(dtype, query_lens, seq_lens, g)
    layer = types.SimpleNamespace(layer_name="model.layers.0.self_attn.attn")

    impl, runtime = adapter_impl(section)
    on_cpu = torch.zeros(query.shape[0], HEADS * DIM, dtype=dtype)
    impl.forward(layer, query, None, None, kv_cache, flash_metadata(common), on_cpu)

    impl, runtime = adapter_impl(section)
    device = common.replace(**{name: to_cuda(getattr(common, name)) for name in (
        "query_start_loc", "seq_lens", "block_table_tensor", "slot_mapping")})
    meta = flash_metadata(device)
    output = to_cuda(torch.zeros_like(on_cpu))
    with emulated_cuda() as mode:
        impl.forward(layer, to_cuda(query), None, None, to_cuda(kv_cache), meta, output)
    assert not mode.round_trips, "\n".join(mode.round_trips)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    torch.testing.assert_close(cpu_values(output), on_cpu, atol=tol, rtol=tol)
    assert runtime.density()

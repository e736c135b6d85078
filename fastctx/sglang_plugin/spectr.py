"""SpecTr in SGLang: ``--speculative-algorithm SPECTR``, a draft-free algorithm like SGLang's NGRAM.

Each decode step drafts k chains per request from fastctx's n-gram draft distribution, lays
them out as one token tree (``fastctx.specdec.tree``: node 0 the newest token, then each
chain), and hands SGLang a ``TARGET_VERIFY`` batch of those trees; fastctx's attention backend
verifies them with one tree read per request. K-SEQ then runs depth by depth among the chains
that match the accepted prefix (``fastctx.specdec.chains``), against the target's distribution
as SGLang's sampler would draw it (temperature, top-k, top-p, min-p; penalties and logit bias
added to the logits as SGLang's own verification adds them), so the output is distributed as
without speculation; greedy requests accept the longest chain prefix equal to the argmax.
The accepted chain's K/V is moved to the request's slots by SGLang's own code.

    --speculative-algorithm SPECTR --speculative-num-draft-tokens 9    # 1 + chains x depth
    --fastctx-spectr '{"chains": 4}'                                   # depth (9 - 1) / 4 = 2

The tree size is fixed at launch (SGLang sizes its KV reservation by it). With ``"scylla": true``
Scylla's policy picks each step's depth and chains among those that fit it (chains x depth <=
num_draft_tokens - 1; unused nodes hang off the root and are never read), timing each step; the
arms run and the fitted law are in ``GET /server_info`` under ``internal_states[i]["fastctx_spectr"]``.
Grammar-constrained requests are not supported. The worker subclasses SGLang's NGRAM worker for its pools and its
prefill path; the algorithm is registered as NGRAM-like (SGLang's NGRAM branches apply).
"""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.layers.logprob_processor import compute_spec_logprobs
from sglang.srt.managers.scheduler import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.speculative.ngram_info import NgramVerifyInput
from sglang.srt.speculative.ngram_worker import NGRAMWorker, _derive_tree_links
from sglang.srt.speculative.spec_utils import move_accept_tokens_to_target_kvcache

from fastctx.sglang_plugin.settings import spectr_params
from fastctx.specdec.chains import verify_chains
from fastctx.specdec.hf_loop import NgramDraft
from fastctx.specdec.kseq import restrict, target_probs
from fastctx.specdec.tree import accepted_path, chain_rows, chain_tree

logger = logging.getLogger(__name__)
# This process's workers, read by the scheduler's state report.
WORKERS: list[SpecTrWorker] = []


class SpecTrWorker(NGRAMWorker):
    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        self.params = spectr_params()
        self.chains = self.params.chains
        budget = self.draft_token_num - 1
        self.depth = budget // self.chains
        self.policy = None
        if self.params.scylla:
            self.policy = self.params.policy(depths=tuple(range(1, budget + 1)), max_drafts=budget)
        self.arms: dict[str, int] = {}
        self.vocab = target_worker.model_runner.model_config.vocab_size
        self.gen = torch.Generator().manual_seed(self.params.seed)
        self.drafts: dict[str, NgramDraft] = {}
        WORKERS.append(self)
        logger.info("SpecTr: %s, trees of %d nodes", "Scylla's choice of chains and depth" if self.policy else
                    f"{self.chains} chains of depth {self.depth}", self.draft_token_num)

    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None):
        if not batch.forward_mode.is_decode():
            return super().forward_batch_generation(batch, on_publish, pp_proxy_tensors)
        started, bs = time.perf_counter(), len(batch.reqs)
        depth, chains = self.policy.choose(bs) if self.policy else (self.depth, self.chains)
        self.arms[f"d{depth}k{chains}"] = self.arms.get(f"d{depth}k{chains}", 0) + 1
        drafted = self._draft(batch, depth, chains)
        result = self.target_worker.forward_batch_generation(batch, pp_proxy_tensors=pp_proxy_tensors,
                                                             is_verify=True)
        predict, accept_index, accept_lens = self._verify(batch, result.logits_output, drafted,
                                                          chain_rows(chains, depth), depth)
        move_accept_tokens_to_target_kvcache(batch, accept_index, accept_lens - 1, self.token_to_kv_pool_allocator)
        if batch.return_logprob:
            compute_spec_logprobs(batch, result.logits_output, predict, accept_index=accept_index)
        new_seq_lens = batch.seq_lens + accept_lens
        if on_publish is not None:
            on_publish(new_seq_lens)
        batch.forward_mode = ForwardMode.DECODE
        if self.policy:
            self.policy.observe(depth, chains, bs, (accept_lens - 1).tolist(), time.perf_counter() - started)
        accept_tokens = predict[accept_index].flatten()
        return GenerationBatchResult(
            logits_output=result.logits_output, next_token_ids=accept_tokens,
            can_run_cuda_graph=result.can_run_cuda_graph, accept_lens=accept_lens, new_seq_lens=new_seq_lens,
            next_draft_input=NgramVerifyInput(draft_token_num=self.draft_token_num, new_seq_lens=new_seq_lens,
                                              accept_tokens=accept_tokens, accept_lens=accept_lens),
            speculative_num_draft_tokens=self.draft_token_num)

    def summary(self) -> dict:
        out = {"arms": dict(self.arms)}
        if self.policy is not None:
            out["scylla_law"] = self.policy.law()
        return out

    def _draft(self, batch, depth: int, k: int) -> list:
        """Draws each request's ``k`` chains of ``depth`` tokens and turns the batch into a TARGET_VERIFY
        batch of their trees."""
        from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func

        live = {req.rid for req in batch.reqs}
        for gone in set(self.drafts) - live:
            del self.drafts[gone]
        n, bs = self.draft_token_num, len(batch.reqs)
        info = batch.sampling_info
        tokens, drafted = torch.empty(bs, n, dtype=torch.int64), []
        for i, req in enumerate(batch.reqs):
            context = list(req.origin_input_ids_unpadded) + list(req.output_ids)
            greedy = int(info.top_ks[i]) <= 1
            draft = self.drafts.get(req.rid)
            if draft is None:
                draft = self.drafts[req.rid] = self.params.draft(self.vocab)
            # Greedy chains from one distribution are all alike: draw one, repeat it.
            chains, p = draft.propose(context, 1 if greedy else k, depth, 0.0 if greedy else 1.0, self.gen)
            chains = chains.expand(k, -1)
            tokens[i] = context[-1]  # unused nodes repeat the root's token
            tokens[i, 1:1 + k * depth] = chains.reshape(-1)
            drafted.append((chains, None if greedy else p))
        tree = chain_tree(k, depth, n)
        mask = tree.expand(bs, n, n)
        next_token, next_sibling = _derive_tree_links(mask.numpy(), bs, n)
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = tokens.flatten().to(self.device)
        batch.out_cache_loc = assign_extend_cache_locs_func(
            req_pool_indices=batch.req_pool_indices, req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens, end_offset=batch.seq_lens + n, batch_size=bs, draft_token_num=n,
            device=self.device)
        batch.spec_info = NgramVerifyInput(
            draft_token=batch.input_ids, custom_mask=mask.flatten().to(self.device),
            positions=(batch.seq_lens.cpu()[:, None] + tree.sum(1) - 1).flatten().to(self.device),
            retrieve_index=torch.arange(bs * n).view(bs, n).to(self.device),
            retrieve_next_token=next_token.to(self.device), retrieve_next_sibling=next_sibling.to(self.device),
            draft_token_num=n)
        return drafted

    def _verify(self, batch, logits_output, drafted, rows: torch.Tensor, depth: int):
        """K-SEQ per request over its chains: ``predict`` holds, at each node of the accepted path, the
        token after it (SGLang's layout); ``accept_index`` those nodes (-1 padded)."""
        n, bs = self.draft_token_num, len(batch.reqs)
        logits = self._sampling_logits(batch, logits_output.next_token_logits).view(bs, n, -1)
        info = batch.sampling_info
        predict = torch.zeros(bs * n, dtype=torch.int32)
        accept_index = torch.full((bs, n), -1, dtype=torch.int32)
        accept_lens = torch.zeros(bs, dtype=torch.int32)
        for i, (chains, p) in enumerate(drafted):
            temperature = 0.0 if p is None else float(info.temperatures[i])
            q = target_probs(logits[i, rows].cpu(), temperature)
            if p is not None:
                q = restrict(q, int(info.top_ks[i]), float(info.top_ps[i]), float(info.min_ps[i]))
            verdict = verify_chains(chains, p, q, self.gen)
            path = accepted_path(verdict.chain, verdict.accepted, depth)
            predict[[i * n + node for node in path]] = torch.tensor(verdict.tokens, dtype=torch.int32)
            accept_index[i, :len(path)] = torch.tensor(path, dtype=torch.int32) + i * n
            accept_lens[i] = len(path)
        return predict.to(self.device), accept_index.to(self.device), accept_lens.to(self.device)

    @staticmethod
    def _sampling_logits(batch, logits: torch.Tensor) -> torch.Tensor:
        """The logits SGLang's verification samples from: penalties and logit bias added per request."""
        info, n = batch.sampling_info, batch.spec_info.draft_token_num
        logits = logits.float().clone()
        if info.acc_additive_penalties is not None:
            logits += info.acc_additive_penalties.repeat_interleave(n, 0)
        if info.acc_scaling_penalties is not None:
            scale = info.acc_scaling_penalties.repeat_interleave(n, 0)
            logits = torch.where(logits > 0, logits / scale, logits * scale)
        if info.logit_bias is not None:
            logits += info.logit_bias.repeat_interleave(n, 0)
        return logits

"""SpecTr in stock vLLM: a ``custom_class`` proposer, and a rejection sampler that verifies its drafts.

vLLM 0.32 verifies one flat chain per request and cannot take draft probabilities from a custom
proposer. fastctx's ``VerifiedDrafts`` replaces vLLM's rejection sampler, and the proposer keeps
the draft probabilities itself, so:

- one chain (speculative sampling, and every request at temperature 0) rides in vLLM's own pass:
  the proposer drafts ``depth`` tokens (n-gram distribution, per request) and keeps their
  distribution; vLLM's next step computes the target's logits behind them, and ``VerifiedDrafts``
  accepts by K-SEQ with k = 1 (``fastctx.specdec.chains``) against those logits, vLLM's own sampler
  drawing the bonus token when every draft is accepted. Cost: vLLM's pass over depth + 1 tokens.
- k >= 2 chains cannot ride in vLLM's one flat chain, so the proposer runs the whole SpecTr step
  between two engine steps: it draws k chains, scores them with the target's own decoder layers
  over the request's cached KV, read in place from vLLM's paged cache (``fastctx.specdec.score``),
  runs K-SEQ depth by depth and hands vLLM the result, the accepted drafts plus the residual or
  bonus token, as the request's "draft". ``VerifiedDrafts`` keeps every such token (each is
  already an exact draw from the target) and samples one more after them with vLLM's own sampler.
  Cost: the chains' scoring pass plus vLLM's pass, for the accepted tokens + 2.

Requests whose sampling vLLM changes beyond temperature (top-p/k, min-p, penalties, logit bias,
allowed/bad words, a seed) get no drafts and decode as without speculation.

    --speculative-config '{"method": "custom_class", "model": "fastctx.vllm_plugin.spectr.SpecTrProposer",
                           "num_speculative_tokens": 5}'            # depth 4: 4 drafts + 1
    --additional-config '{"fastctx_spectr": {"chains": 4}}'

vLLM's per-batch-size schedule applies too: with ``"num_speculative_tokens_per_batch_size": [[1, 2, 4],
[3, 64, 0]]`` in the speculative config a step of b requests drafts the schedule's depth for b (here
4 up to two requests, none beyond), capped at ``num_speculative_tokens - 1``.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from vllm.logger import init_logger

from fastctx.methods.base import KnobError
from fastctx.specdec.params import CONFIG_KEY, SpecTrParams
from fastctx.specdec.scylla import Plan

logger = init_logger("vllm.fastctx.spectr")

PROPOSER = "fastctx.vllm_plugin.spectr.SpecTrProposer"


def spectr_params(vllm_config) -> SpecTrParams:
    """SpecTr's knobs from vLLM's ``additional_config["fastctx_spectr"]``, checked against its speculative
    config."""
    extra = vllm_config.additional_config
    params = SpecTrParams.from_dict((extra or {}).get(CONFIG_KEY, {}) if isinstance(extra, dict) else {})
    spec = vllm_config.speculative_config
    if params.scylla and getattr(spec, "num_speculative_tokens_per_batch_size", None):
        raise KnobError(f"{CONFIG_KEY}.scylla=true picks the depth per step itself; drop "
                        "num_speculative_tokens_per_batch_size from --speculative-config, or scylla")
    if spec.num_speculative_tokens < 2:
        raise KnobError(f"SpecTr: num_speculative_tokens={spec.num_speculative_tokens} leaves no draft depth; "
                        "it carries the verified drafts plus one token, so set it to depth + 1 (>= 2)")
    return params


def uses_spectr(vllm_config) -> bool:
    spec = vllm_config.speculative_config
    return spec is not None and spec.model == PROPOSER


def plain_sampling(sp) -> bool:
    """Sampling vLLM does as softmax(logits / temperature) alone, which K-SEQ's target must equal."""
    top_k_off = sp.top_k in (0, -1, None)
    return (sp.top_p >= 1.0 and top_k_off and not sp.min_p and not sp.presence_penalty
            and not sp.frequency_penalty and sp.repetition_penalty == 1.0 and not sp.logit_bias
            and sp.allowed_token_ids is None and not sp.bad_words and sp.seed is None
            and not getattr(sp, "logits_processors", None))


class SpecTrStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # verification steps run (one per request and engine step with drafts)
        self.tokens = 0  # tokens they produced (accepted drafts + the residual or bonus)
        self.accepted = 0
        self.engine_tokens = 0  # tokens vLLM kept in those steps (chains verified ahead get one more)
        self.skipped = 0  # request steps left without drafts (their sampling is not plain)

    def add(self, tokens: int, verified_ahead: bool) -> None:
        with self._lock:
            self.steps += 1
            self.tokens += tokens
            self.accepted += tokens - 1
            self.engine_tokens += tokens + verified_ahead

    def summary(self, reset: bool = False) -> dict:
        with self._lock:
            out = {"steps": self.steps, "tokens": self.tokens, "accepted_drafts": self.accepted,
                   "skipped": self.skipped,
                   # accepted drafts + the residual or bonus token: SpecTr's accepted length
                   "tokens_per_verification": self.tokens / self.steps if self.steps else 0.0,
                   # vLLM adds one token of its own after each run of chains verified ahead
                   "tokens_per_step": self.engine_tokens / self.steps if self.steps else 0.0}
            if reset:
                self.reset()
            return out


class SpecTrProposer:
    def __init__(self, vllm_config):
        self.params = spectr_params(vllm_config)
        self.depth = vllm_config.speculative_config.num_speculative_tokens - 1
        self.vocab = vllm_config.model_config.get_vocab_size()
        self.gen = torch.Generator().manual_seed(self.params.seed)
        self.drafts: dict = {}  # request id -> its NgramDraft
        # request id -> (drafts [1, n], their distribution [1, n, V] or None at temperature 0, temperature):
        # one chain handed to vLLM, which VerifiedDrafts verifies against vLLM's logits next step
        self.pending: dict[str, tuple] = {}
        self.accepted: dict[str, int] = {}  # request id -> drafts accepted in the step Scylla has yet to time
        self.stats = SpecTrStats()
        # The check (RPC fastctx_spectr_check): the target's logits behind each request's verified
        # tokens, compared with vLLM's logits for the same positions one step later.
        self.record = False
        self.recorded: dict[str, torch.Tensor] = {}
        self.gaps: list[float] = []
        self.policy = None
        if self.params.scylla:
            self.policy = self.params.policy(depths=tuple(range(self.depth + 1)))
        # vLLM's own per-batch-size schedule (num_speculative_tokens_per_batch_size): vLLM passes its
        # choice to built-in proposers only, so the proposer reads the same lookup vLLM builds.
        self.table = None
        schedule = getattr(vllm_config.speculative_config, "num_speculative_tokens_per_batch_size", None)
        if schedule:
            from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

            self.table = build_dynamic_sd_schedule_lookup(schedule, vllm_config.scheduler_config.max_num_seqs,
                                                          vllm_config.speculative_config.num_speculative_tokens)
        self._last_step = None  # (plan, request ids, started, id -> copying) of a step Scylla has yet to time
        self.arms: dict[str, int] = {}
        self.runner = None
        self._target = None
        self._stack = None

    def load_model(self, target_model) -> None:
        self._target = target_model

    def attach(self, runner) -> None:
        """Called by fastctx's worker once the model is loaded: the proposer reads the batch's block
        tables and requests from the runner, and vLLM keeps every verified token."""
        self.runner = runner
        runner.rejection_sampler = VerifiedDrafts(runner.rejection_sampler, self)

    def stack(self):
        if self._stack is None:
            from fastctx.vllm_plugin.decoder_stack import VllmDecoderStack

            self._stack = VllmDecoderStack(self._target)
        return self._stack

    @torch.inference_mode()
    def propose(self, sampled_token_ids, num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings=None, **_) -> list[list[int]]:
        if self.runner is None:
            raise RuntimeError("SpecTr: the proposer was not attached to the model runner; run fastctx's worker "
                               "(leave --worker-cls at auto)")
        batch = self.runner.input_batch
        live = set(batch.req_ids)
        for gone in set(self.drafts) - live:
            del self.drafts[gone]
        self.pending.clear()  # whatever vLLM did not schedule of the last drafts is not verified
        now = time.perf_counter()
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        eligible = []
        for row, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[row] if row < len(batch.req_ids) else None
            if not sampled or req_id is None:
                continue
            sp = self.runner.requests[req_id].sampling_params
            if not plain_sampling(sp):
                self.stats.skipped += 1
                continue
            eligible.append((row, req_id, float(sp.temperature), self._request_arm(sp)))
        ids = frozenset(e[1] for e in eligible)
        if self._last_step is not None:
            # A step's time runs from one proposal to the next (ours and vLLM's pass); it is a decode step's
            # only if the same requests went on (no prefill joined, no idle gap between generate calls).
            plan, last_ids, started, copying = self._last_step
            if last_ids == ids:  # requests that drafted nothing accepted nothing; vLLM verified the others'
                verified = [r for r in copying if r in self.accepted or not plan.depth_of(copying[r])]
                self.policy.observe_plan(plan, len(ids), [self.accepted.get(r, 0) for r in verified], now - started,
                                         [copying[r] for r in verified])
            self._last_step = None
        self.accepted.clear()
        if not eligible:
            return out
        # Requests that name their own arm run it; the engine's schedule (Scylla's or vLLM's table) picks
        # for the rest. Scylla times only the steps it picked for every request.
        scheduled = [e for e in eligible if e[3] is None]
        plan, copying = None, {}
        if self.policy and scheduled:  # Scylla drafts deeper for the requests that are copying
            copying = {req_id: self._draft(req_id).copying(self._tokens(row, token_ids_cpu, num_tokens_no_spec))
                       for row, req_id, *_ in scheduled}
            plan = self.policy.plan(len(eligible), sum(copying.values()))
        if self.table is not None:  # indexed like vLLM's scheduler: by the step's number of requests
            depth = min(self.table[min(len(sampled_token_ids), len(self.table) - 1)], self.depth)
            plan = Plan(depth, self.params.chains, depth, sum(copying.values()))
        plan = plan or Plan(self.depth, self.params.chains, self.depth)
        work = []
        for row, req_id, temperature, arm in eligible:
            depth, k = arm or (plan.depth_of(copying.get(req_id, False)), plan.chains)
            self.arms[f"d{depth}k{k}"] = self.arms.get(f"d{depth}k{k}", 0) + 1
            if depth:
                tokens = self._tokens(row, token_ids_cpu, num_tokens_no_spec)
                work.append((row, req_id, tokens, 0.0 if temperature < 1e-5 else temperature, depth, k))
        verified = self._verify(work) if work else []
        for (row, *_), tokens in zip(work, verified):
            out[row] = tokens
        if self.policy is not None and len(scheduled) == len(eligible):  # Scylla picked for every request
            self._last_step = (plan, ids, now, copying)
        return out

    @staticmethod
    def _tokens(row: int, token_ids_cpu: np.ndarray, num_tokens_no_spec: np.ndarray) -> list[int]:
        return token_ids_cpu[row, :int(num_tokens_no_spec[row])].tolist()

    def _draft(self, req_id: str):
        draft = self.drafts.get(req_id)
        if draft is None:
            draft = self.drafts[req_id] = self.params.draft(self.vocab)
        return draft

    def _request_arm(self, sp) -> tuple[int, int] | None:
        """(depth, chains) a request asks for with ``extra_args={"spectr": {"depth", "chains"}}`` within the
        engine's bounds (depth 0: no drafts; the one not named is the engine's), or None where it asks for
        neither: then the engine's schedule picks (Scylla's, vLLM's per-batch-size table, or the engine's
        depth and chains)."""
        ask = (sp.extra_args or {}).get("spectr") or {}
        if not ask:
            return None
        depth, k = ask.get("depth", self.depth), ask.get("chains", self.params.chains)
        if not (isinstance(depth, int) and 0 <= depth <= self.depth and isinstance(k, int) and 1 <= k <= 16):
            logger.warning_once("SpecTr: a request asked for depth=%r, chains=%r; this engine serves depth "
                                "0-%d (num_speculative_tokens - 1) and 1-16 chains: it runs the engine's %d x %d",
                                depth, k, self.depth, self.depth, self.params.chains)
            return self.depth, self.params.chains
        return depth, k

    def summary(self, reset: bool = False) -> dict:
        out = {**self.stats.summary(reset), "arms": dict(self.arms)}
        if self.policy is not None:
            out["scylla_law"] = self.policy.law()
        if self.record:
            out["logit_gap_max"], out["logit_gap_count"] = max(self.gaps, default=0.0), len(self.gaps)
        if reset:
            self.arms.clear()
        return out

    def _verify(self, work: list[tuple]) -> list[list[int]]:
        """Draft each request's chains; one chain goes to vLLM to verify in its own pass, several are
        scored together in one pass of the proposer's and verified here."""
        from fastctx.specdec.chains import verify_chains
        from fastctx.specdec.kseq import target_probs
        from fastctx.specdec.score import Chains, score_batch

        out, ahead, batch = [], [], []
        for row, req_id, tokens, temperature, depth, k in work:
            draft = self._draft(req_id)
            # temperature 0 (vLLM samples greedily below 1e-5): chains from one distribution are all alike
            k = k if temperature else 1
            drafts, p = draft.propose(tokens, k, depth, temperature, self.gen)
            out.append(drafts[0].tolist())
            if k == 1:
                self.pending[req_id] = (drafts, p if temperature else None, temperature)
                continue
            start = len(tokens) - 1  # the newest token has no KV yet; everything before it does
            ahead.append((len(out) - 1, req_id, temperature, drafts, p))
            batch.append(Chains(tokens[-1], drafts, start, self._prefix(row, start) if start else None))
        scored = score_batch(self.stack(), batch) if batch else []
        for (at, req_id, temperature, drafts, p), logits in zip(ahead, scored):
            verdict = verify_chains(drafts, p, target_probs(logits, temperature), self.gen)
            self.stats.add(len(verdict.tokens), verified_ahead=True)
            self.accepted[req_id] = verdict.accepted
            if self.record:
                self.recorded[req_id] = logits[verdict.chain, :len(verdict.tokens)].float()
            out[at] = verdict.tokens
        return out

    def verify_in_pass(self, req_id: str, drafts: torch.Tensor, target_logits: torch.Tensor,
                       bonus: int) -> list[int] | None:
        """The tokens vLLM keeps for a chain this proposer handed it unverified: K-SEQ with k = 1 over
        the ``drafts`` vLLM scheduled and its logits behind them (``target_logits`` ``[n, V]``, vLLM's
        logits processors applied), then vLLM's ``bonus`` if every draft is accepted. None if the
        request's drafts were verified ahead."""
        from fastctx.specdec.chains import verify_chains
        from fastctx.specdec.kseq import target_probs

        pending = self.pending.pop(req_id, None)
        if pending is None:
            return None
        mine, p, temperature = pending
        n = len(drafts)
        if n > mine.shape[1] or not torch.equal(mine[0, :n], drafts.to(mine.dtype)):
            raise RuntimeError(f"SpecTr: vLLM scheduled drafts {drafts.tolist()} for request {req_id}, "
                               f"not the proposer's {mine[0].tolist()}")
        q = target_probs(target_logits, temperature)
        # The bonus row is vLLM's to sample; K-SEQ only needs a distribution there to stay well-formed.
        q = torch.cat([q, q[-1:]])[None]
        verdict = verify_chains(mine[:, :n], None if p is None else p[:, :n], q, self.gen)
        tokens = verdict.tokens
        if verdict.accepted == n:
            tokens[-1] = bonus
        self.stats.add(len(tokens), verified_ahead=False)
        self.accepted[req_id] = verdict.accepted
        return tokens

    def _prefix(self, row: int, start: int):
        from fastctx.vllm_plugin.paged_kv import prefix_reader

        stack = self.stack()
        return prefix_reader(stack, lambda layer: stack.attention(layer).kv_cache,
                             self.runner.input_batch.block_table[0].get_cpu_tensor()[row], start,
                             "SpecTr: cannot read the request's cached KV")


class VerifiedDrafts(torch.nn.Module):
    """vLLM's rejection sampler for SpecTr's drafts. A chain the proposer handed over unverified is
    verified against this pass's logits (``SpecTrProposer.verify_in_pass``); chains verified ahead are
    kept whole (each token is already a draw from the target). Either way the last token, when every
    draft stands, is vLLM's own sampler's draw from the target's logits after them."""

    def __init__(self, stock, drafter: SpecTrProposer):
        super().__init__()
        self.stock = stock
        self.sampler = stock.sampler
        self.drafter = drafter

    def _check(self, metadata, logits) -> None:
        """Largest log-prob gap between the proposer's target rows and vLLM's for the verified tokens."""
        d, at = self.drafter, 0
        for row, n in enumerate(metadata.num_draft_tokens):
            mine = d.recorded.pop(d.runner.input_batch.req_ids[row], None)
            if n and mine is not None:
                theirs = logits[metadata.target_logits_indices[at:at + n]].float()
                d.gaps.append(float((theirs.log_softmax(-1) - mine.log_softmax(-1)).abs().max()))
            at += n

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        from dataclasses import replace

        from vllm.v1.outputs import SamplerOutput

        d = self.drafter
        if d.record:
            self._check(metadata, logits)
        bonus = self.stock.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=replace(sampling_metadata, max_num_logprobs=-1), predict_bonus_token=True,
            logprobs_mode_override="processed_logits" if self.stock.is_processed_logprobs_mode else "raw_logits")
        counts = metadata.num_draft_tokens
        out = torch.full((len(counts), metadata.max_spec_len + 1), -1, dtype=torch.int32, device=logits.device)
        drafts = metadata.draft_token_ids.to(torch.int32)
        processed = None
        if d.pending:  # chains for vLLM's pass to verify: its processing of the target rows, as its sampler's
            raw = logits[metadata.target_logits_indices].to(torch.float32)
            processed = self.stock.apply_logits_processors(raw.clone(), sampling_metadata, metadata).cpu()
        at = 0
        for row, n in enumerate(counts):
            extra = int(bonus.sampled_token_ids[row, 0])
            kept = None
            if n and processed is not None:
                kept = d.verify_in_pass(d.runner.input_batch.req_ids[row], drafts[at:at + n].cpu(),
                                        processed[at:at + n], extra)
            if kept is None:  # verified ahead (or no drafts): every draft is kept, vLLM's token follows
                out[row, :n] = drafts[at:at + n]
                out[row, n] = extra
            else:
                out[row, :len(kept)] = torch.tensor(kept, dtype=torch.int32)
            at += n
        logprobs = None
        if sampling_metadata.max_num_logprobs is not None:
            raw = logits[metadata.target_logits_indices].to(torch.float32)
            logprobs = self.stock._get_logprobs_tensors(sampling_metadata.max_num_logprobs, metadata, logits, raw,
                                                        bonus.logprobs_tensors.logprobs, out)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs)

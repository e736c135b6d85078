"""A decoding loop over a transformers causal LM: no speculation, speculative sampling (k = 1),
SpecTr (k chains) and Scylla's adaptive policy, one request at a time.

It is the engine-free yardstick for the engine integrations: the same draft source and the same
verification as an engine would run, with the target's KV in a transformers ``DynamicCache``.
A step copies the request's KV to the k chains, drafts ``depth`` tokens per chain, scores
``[k, depth + 1]`` positions with the target in one forward, verifies with ``verify_chains`` and
keeps the winning chain's KV.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from fastctx.specdec.chains import verify_chains
from fastctx.specdec.kseq import sample, target_probs
from fastctx.specdec.scylla import ScyllaPolicy


def layer_skip_draft(target, layers: int):
    """The target's first ``layers`` decoder layers with its embeddings, final norm and head."""
    from transformers import AutoModelForCausalLM

    total = target.config.num_hidden_layers
    if not 1 <= layers < total:
        raise ValueError(f"draft layers={layers}: must be in [1, {total - 1}] for a {total}-layer target")
    cfg = target.config.__class__.from_dict(target.config.to_dict())
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    draft = AutoModelForCausalLM.from_config(cfg, dtype=target.dtype)
    missing, _ = draft.load_state_dict(target.state_dict(), strict=False)
    if missing:
        raise ValueError(f"draft misses target weights: {missing[:3]}")
    return draft.eval()


def _draw(probs: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` ``[..., V]``: sampled, or the argmax at temperature 0."""
    if not temperature:
        return probs.argmax(-1)
    return sample(probs, gen)


def _keep(cache, row: int, length: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[row:row + 1, :, :length].contiguous()
        layer.values = layer.values[row:row + 1, :, :length].contiguous()


def _expand(cache, k: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys.expand(k, -1, -1, -1).contiguous()
        layer.values = layer.values.expand(k, -1, -1, -1).contiguous()


@dataclass
class Stats:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    arms: dict = field(default_factory=dict)

    @property
    def accept_len(self) -> float:
        """Tokens per target forward (accepted drafts plus the target's own token)."""
        return self.tokens / max(self.steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class ModelDraft:
    """Drafts from a causal LM with its own KV: a draft model, the layer-skip copy, or the target
    itself with ``window`` set (its cache cut to ``sink`` first and ``window`` last tokens: the
    sparse-KV self-speculation idea, no second model)."""

    def __init__(self, model, sink: int = 4, window: int | None = None):
        from transformers import DynamicCache

        if window is not None and (window < 1 or sink < 0):
            raise ValueError(f"streaming draft sink={sink}, window={window}: need sink >= 0 and window >= 1")
        self.model, self.sink, self.window = model, sink, window
        self.cache = DynamicCache()
        self.fed = 0  # tokens the draft has seen (positions), whatever its cache kept

    def _held(self) -> int:
        return self.cache.layers[0].keys.shape[2] if self.cache.layers else 0

    def _trim(self) -> None:
        if self.window is None or self._held() <= self.sink + self.window:
            return
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t[:, :, :self.sink], t[:, :, -self.window:]], 2).contiguous())

    def propose(self, tokens: list[int], k: int, depth: int, temperature: float, gen: torch.Generator):
        n = len(tokens)
        if self.fed < n - 1:  # catch up on everything but the newest token, fed below per chain
            pos = torch.arange(self.fed, n - 1).unsqueeze(0)
            self.model(input_ids=torch.tensor([tokens[self.fed:n - 1]]), past_key_values=self.cache,
                       position_ids=pos, use_cache=True)
            self.fed = n - 1
            self._trim()
        self._base = self._held()
        _expand(self.cache, k)
        drafts = torch.empty(k, depth, dtype=torch.long)
        p = torch.empty(k, depth, self.model.config.vocab_size, dtype=torch.float64)
        last = torch.full((k, 1), tokens[-1])
        for t in range(depth):
            logits = self.model(input_ids=last, past_key_values=self.cache, position_ids=torch.full((k, 1), n - 1 + t),
                                use_cache=True).logits[:, -1]
            p[:, t] = target_probs(logits, temperature)
            drafts[:, t] = _draw(p[:, t], temperature, gen)
            last = drafts[:, t:t + 1]
        return drafts, p

    def accept(self, chain: int, accepted: int, depth: int) -> None:
        # It was fed the newest token and every draft but the deepest.
        fed = 1 + min(accepted, depth - 1)
        _keep(self.cache, chain, self._base + fed)
        self.fed += fed
        self._trim()


# Jelinek-Mercer weight of each longer context over the shorter ones. 0.5 from the bigram context up
# raised first-draft acceptance for one chain and for four over the longest match alone, on 6 of
# SmolLM2's copy-task samples x 64 tokens; where the model still copies exactly, one chain accepts a
# little less (README, speculative decoding).
INTERPOLATION = 0.5


class NgramDraft:
    """Prompt lookup as a draft distribution: the tokens that followed earlier occurrences of the
    context's last n tokens, in proportion to how often, for every n in [min_n, max_n] that
    occurred, interpolated (Jelinek-Mercer): each longer context's counts get weight
    ``interpolation`` over what the shorter ones give, down to the context's own token
    frequencies. ``interpolation=1`` keeps the longest match alone. Being a distribution, its k
    chains differ, which plain prompt lookup's single continuation cannot give SpecTr; the
    shorter contexts' alternatives are what the chains beyond the first can add."""

    def __init__(self, vocab: int, min_n: int = 1, max_n: int = 4, interpolation: float = INTERPOLATION):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram min_n={min_n}, max_n={max_n}: need 1 <= min_n <= max_n")
        if not 0 < interpolation <= 1:
            raise ValueError(f"ngram interpolation={interpolation}: give a weight in (0, 1] "
                             "(1: the longest matching context alone)")
        self.vocab, self.min_n, self.max_n, self.interpolation = vocab, min_n, max_n, interpolation
        self.follow: dict[tuple, Counter] = {}
        self.unigram: Counter = Counter()
        self.indexed = 0
        self._unigram_share: torch.Tensor | None = None  # the context's token frequencies, dense

    def _index(self, tokens: list[int]) -> None:
        if self.indexed >= len(tokens):  # a request's tokens only grow: nothing new
            return
        for i in range(self.indexed, len(tokens)):
            self.unigram[tokens[i]] += 1
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self.follow.setdefault(tuple(tokens[i - n:i]), Counter())[tokens[i]] += 1
        self.indexed = len(tokens)
        self._unigram_share = None

    def _sparse_share(self, counts: Counter) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.tensor(list(counts.values()), dtype=torch.float64)
        return torch.tensor(list(counts), dtype=torch.long), values / values.sum()

    def dist(self, tail: list[int]) -> torch.Tensor:
        # Interpolated from the longest matching context down: the longest gets weight w, the next
        # w (1 - w), ... and the context's token frequencies what is left. Only the frequencies are
        # dense; a drafting step asks for depth x k distributions over the whole vocabulary, so they
        # are built once per indexed context and the contexts' few followers added sparsely.
        matches = []
        for n in range(self.min_n, min(self.max_n, len(tail)) + 1):
            counts = self.follow.get(tuple(tail[-n:]))
            if counts is None:  # a longer context cannot have occurred either
                break
            matches.append(counts)
        w = self.interpolation
        rest = (1 - w) ** len(matches)
        if self._unigram_share is None:
            index, share = self._sparse_share(self.unigram)
            self._unigram_share = torch.zeros(self.vocab, dtype=torch.float64).index_add_(0, index, share)
        p = self._unigram_share * rest
        for depth_from_longest, counts in enumerate(reversed(matches)):
            index, share = self._sparse_share(counts)
            p.index_add_(0, index, share * (w * (1 - w) ** depth_from_longest))
            if w == 1:
                break
        return p

    def copying(self, tokens: list[int]) -> bool:
        """Whether the newest token is the one the longest earlier match of the tokens before it was
        followed by most often: the request is copying, and its next drafts are likelier to stand."""
        if len(tokens) < 2 or self.indexed > len(tokens) - 1:  # too short, or the newest token already counted
            return False
        self._index(tokens[:-1])
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            counts = self.follow.get(tuple(tokens[-1 - n:-1]))
            if counts:
                return counts.most_common(1)[0][0] == tokens[-1]
        return False

    def propose(self, tokens: list[int], k: int, depth: int, temperature: float, gen: torch.Generator):
        self._index(tokens)
        drafts = torch.empty(k, depth, dtype=torch.long)
        p = torch.empty(k, depth, self.vocab, dtype=torch.float64)
        for c in range(k):
            tail = tokens[-self.max_n:]
            for t in range(depth):
                p[c, t] = self.dist(tail)
                tok = int(_draw(p[c, t], temperature, gen))
                drafts[c, t] = tok
                tail = tail[1:] + [tok] if len(tail) == self.max_n else tail + [tok]
        return drafts, p

    def accept(self, chain: int, accepted: int, depth: int) -> None:
        pass


class Request:
    def __init__(self, target, draft: ModelDraft | NgramDraft | None, prompt: list[int]):
        from transformers import DynamicCache

        self.target, self.draft = target, draft
        self.tokens = list(prompt)
        self.cache = DynamicCache()
        self.fed = 0  # tokens whose KV the target cache holds

    def _feed(self, ids: list[int]) -> torch.Tensor:
        pos = torch.arange(self.fed, self.fed + len(ids)).unsqueeze(0)
        out = self.target(input_ids=torch.tensor([ids]), past_key_values=self.cache, position_ids=pos, use_cache=True)
        self.fed += len(ids)
        return out.logits[0, -1]

    def prefill(self) -> None:
        """Every prompt token but the last: each step starts by feeding the newest token."""
        if len(self.tokens) > 1:
            self._feed(self.tokens[:-1])

    def plain_step(self, temperature: float, gen: torch.Generator) -> int:
        self.tokens.append(int(_draw(target_probs(self._feed(self.tokens[self.fed:]), temperature), temperature, gen)))
        return 1

    def spec_step(self, depth: int, k: int, temperature: float, gen: torch.Generator) -> int:
        """One SpecTr step; returns how many tokens it added."""
        n = len(self.tokens)
        drafts, p = self.draft.propose(self.tokens, k, depth, temperature, gen)
        # Every chain's depth + 1 positions in one target forward over the shared prefix.
        if self.fed < n - 1:
            self._feed(self.tokens[self.fed:n - 1])
        _expand(self.cache, k)
        ids = torch.cat([torch.full((k, 1), self.tokens[-1]), drafts], 1)
        pos = torch.arange(n - 1, n + depth).expand(k, -1)
        logits = self.target(input_ids=ids, past_key_values=self.cache, position_ids=pos, use_cache=True).logits
        verdict = verify_chains(drafts, p if temperature else None, target_probs(logits, temperature), gen)
        # The target keeps the newest token and the accepted drafts of the winning chain.
        _keep(self.cache, verdict.chain, n + verdict.accepted)
        self.fed = n + verdict.accepted
        self.draft.accept(verdict.chain, verdict.accepted, depth)
        self.tokens += verdict.tokens
        return len(verdict.tokens)


def generate(target, draft, prompt: list[int], max_new: int, temperature: float, seed: int,
             depth: int = 0, k: int = 1, policy: ScyllaPolicy | None = None, stats: Stats | None = None):
    """Generate ``max_new`` tokens (a last step may overshoot; the surplus is dropped).
    ``depth`` 0 and no policy: no speculation."""
    if temperature < 0 or depth < 0 or k < 1:
        raise ValueError(f"temperature={temperature}, depth={depth}, k={k}: need temperature >= 0, "
                         "depth >= 0 (0: no speculation) and k >= 1 chains")
    if (depth or policy is not None) and draft is None:
        raise ValueError("speculation needs a draft source (ModelDraft or NgramDraft)")
    gen = torch.Generator().manual_seed(seed)
    stats = stats if stats is not None else Stats()
    req = Request(target, draft, prompt)
    with torch.inference_mode():
        req.prefill()
        start = time.perf_counter()
        while len(req.tokens) - len(prompt) < max_new:
            t0 = time.perf_counter()
            if policy is not None:
                # an n-gram draft tells whether the request is copying; a model draft has no such signal
                copying = isinstance(draft, NgramDraft) and draft.copying(req.tokens)
                plan = policy.plan(1, int(copying))
                g, kk = plan.depth_of(copying), plan.chains
                added = req.spec_step(g, kk, temperature, gen) if g else req.plain_step(temperature, gen)
                policy.observe_plan(plan, 1, [added - 1], time.perf_counter() - t0, [copying])
                stats.arms[(g, kk)] = stats.arms.get((g, kk), 0) + 1
            elif depth:
                added = req.spec_step(depth, k, temperature, gen)
            else:
                added = req.plain_step(temperature, gen)
            stats.steps += 1
            stats.tokens += added
        stats.seconds += time.perf_counter() - start
    return req.tokens[len(prompt):len(prompt) + max_new], stats

"""SpecTr's knobs, the same for every engine (vLLM's ``additional_config["fastctx_spectr"]``,
SGLang's ``--fastctx-spectr``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fastctx.methods.base import KnobError
from fastctx.specdec.hf_loop import INTERPOLATION, NgramDraft
from fastctx.specdec.scylla import ScyllaPolicy

CONFIG_KEY = "fastctx_spectr"


@dataclass(frozen=True)
class SpecTrParams:
    chains: int = 4  # k i.i.d. draft chains per step (with scylla: the most it may pick)
    scylla: bool = False  # pick depth (0 .. num_speculative_tokens - 1) and chains per step (ScyllaPolicy)
    ngram_min: int = 1  # the n-gram draft: shortest context suffix looked up
    ngram_max: int = 4  # longest
    ngram_interpolation: float = INTERPOLATION  # each longer context's weight over the shorter ones' (1: longest)
    seed: int = 0  # the proposer's own random stream (drafts and K-SEQ's coins)

    @classmethod
    def from_dict(cls, raw: dict) -> SpecTrParams:
        if not isinstance(raw, dict):
            raise KnobError(f"{CONFIG_KEY}: give a JSON object of knobs, got {raw!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise KnobError(f"{CONFIG_KEY}: unknown key(s) {unknown}; known: {sorted(known)}")
        params = cls(**raw)
        if not isinstance(params.chains, int) or not 1 <= params.chains <= 16:
            raise KnobError(f"{CONFIG_KEY}.chains={params.chains!r}: give 1-16 chains (1 is speculative sampling)")
        if not isinstance(params.scylla, bool):
            raise KnobError(f"{CONFIG_KEY}.scylla={params.scylla!r}: give true or false")
        if not 1 <= params.ngram_min <= params.ngram_max:
            raise KnobError(f"{CONFIG_KEY}: ngram_min={params.ngram_min}, ngram_max={params.ngram_max}: "
                            "need 1 <= ngram_min <= ngram_max")
        if not (isinstance(params.ngram_interpolation, (int, float)) and 0 < params.ngram_interpolation <= 1):
            raise KnobError(f"{CONFIG_KEY}.ngram_interpolation={params.ngram_interpolation!r}: give a weight in "
                            "(0, 1]; 1 drafts from the longest matching context alone")
        return params

    def draft(self, vocab: int) -> NgramDraft:
        """A request's n-gram draft distribution with these knobs."""
        return NgramDraft(vocab, self.ngram_min, self.ngram_max, float(self.ngram_interpolation))

    def policy(self, depths: tuple[int, ...], max_drafts: int | None = None) -> ScyllaPolicy:
        """Scylla's policy over ``depths`` and chain counts 1, 2, 4 ... up to ``chains``."""
        return ScyllaPolicy(depths=depths, chains=tuple(c for c in (1, 2, 4, 8, 16) if c <= self.chains),
                            max_drafts=max_drafts, seed=self.seed)

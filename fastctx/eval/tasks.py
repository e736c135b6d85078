"""SCBench-style shared-context tasks, generated locally from a seed.

A *session* is one shared context and several queries over it, in SCBench's
record format ``{id, context, multi_turns: [{input, answer}]}``. Contexts are
sized in tokens of the model's tokenizer. Recipes follow SCBench's generators
(InfiniteBench / RULER) where they are synthetic; ``passkey`` (several labelled
needles, one per query) and ``multidoc_qa`` (separate documents, the CacheBlend
setting) are our reconstructions. Every template puts the context before the
query, so that multi-request mode shares the context as a cacheable prefix.

Real SCBench JSONL files (``scbench_<task>.jsonl``) load with
:func:`load_scbench_sessions`; tasks whose scorer is not implemented are refused.
"""

from __future__ import annotations

import inspect
import json
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastctx.eval.texts import natural_text, token_ids

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


@dataclass
class Session:
    id: str
    task: str
    length: int  # the context's size limit in tokens
    context: str
    turns: list[dict]  # [{"input": str, "answer": str | list[str]}]
    chunks: list[str] = field(default_factory=list)  # separately reusable pieces of the context


@dataclass(frozen=True)
class Task:
    name: str
    template: str  # first (or only) user message; {context} and {input}
    follow_up: str  # later user messages in multi-turn mode; {input}
    max_new_tokens: int  # SCBench's generation limit
    score: Callable[[str, object], float]
    generate: Callable | None = None  # (rng, units, n_queries[, length]) -> (context, turns, chunks)
    units: tuple[int, int] = (1, 1)  # (minimum, first guess) for sizing


# ---- scorers (SCBench's compute_scores) -------------------------------------------------

def contains(pred: str, answer) -> float:
    return float(str(answer) in pred)


def first_int_equals(pred: str, answer) -> float:
    match = re.search(r"-?\d+", pred)
    return float(match is not None and int(match.group()) == int(answer))


def all_names(pred: str, answer) -> float:
    return sum(name in pred for name in answer) / len(answer)


# ---- generators --------------------------------------------------------------------------

def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _spread(n_items: int, n_queries: int) -> list[int]:
    """Query positions spread over the context's depth (InfiniteBench sweeps depth too)."""
    if n_queries > n_items:
        raise ValueError(f"{n_queries} queries need at least as many items, context has {n_items}")
    return [int((i + 0.5) * n_items / n_queries) for i in range(n_queries)]


def gen_kv(rng, units, n_queries):
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(units)]
    context = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs) + "}"
    turns = [{"input": f'Key: "{pairs[i][0]}"\nThe value associated with the specified key is: ',
              "answer": pairs[i][1]} for i in _spread(units, n_queries)]
    return context, turns, []


def _random_string(rng, length):
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(length))


def gen_prefix_suffix(rng, units, n_queries):
    strings = [_random_string(rng, rng.randint(20, 30)) for _ in range(units)]
    targets = _spread(units, n_queries)
    for i in targets:
        # Distractors sharing the prefix or the suffix: both constraints are needed.
        s = strings[i]
        strings.append(s[:4] + _random_string(rng, len(s) - 8) + _random_string(rng, 4))
        strings.append(_random_string(rng, 4) + _random_string(rng, len(s) - 8) + s[-4:])
    answers = [strings[i] for i in targets]
    rng.shuffle(strings)
    context = "\n".join(strings)
    turns = [{"input": f"What is the string that starts with '{s[:4]}' and ends with '{s[-4:]}'?",
              "answer": s} for s in answers]
    return context, turns, []


def gen_variable_tracking(rng, units, n_queries, hops=4):
    lines = [NOISE] * units
    values = rng.sample(range(10000, 100000), n_queries)
    used, turns = set(), []
    for value in values:
        names = []
        while len(names) < hops + 1:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if name not in used:
                used.add(name)
                names.append(name)
        chain = [f"VAR {names[0]} = {value} "] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
        positions = sorted(rng.choices(range(len(lines) + 1), k=len(chain)))
        for shift, (pos, stmt) in enumerate(zip(positions, chain)):
            lines.insert(pos + shift, stmt)  # each earlier insertion moved the list by one
        turns.append({"input": f"Question: Find all variables that are assigned the value {value} in the "
                               f"text above. Answer: According to the chain(s) of variable assignment in "
                               f"the text above, {hops + 1} variables are assigned the value {value}, "
                               f"they are: ",
                      "answer": names})
    return " ".join(lines), turns, []


MATH_STATS = {
    "largest": lambda xs: max(xs),
    "smallest": lambda xs: min(xs),
    "median": lambda xs: sorted(xs)[len(xs) // 2],
    "second largest": lambda xs: sorted(xs)[-2],
    "second smallest": lambda xs: sorted(xs)[1],
}


def gen_math_find(rng, units, n_queries):
    if n_queries > len(MATH_STATS):
        raise ValueError(f"math_find asks at most {len(MATH_STATS)} distinct questions per context")
    numbers = [rng.randrange(0, 100000) for _ in range(units | 1)]  # odd: the median is a member
    turns = [{"input": f"What is the {stat} number in the list?\nThe {stat} number in the list is:",
              "answer": str(MATH_STATS[stat](numbers))} for stat in list(MATH_STATS)[:n_queries]]
    return "[" + ", ".join(map(str, numbers)) + "]", turns, []


PASSKEY_LABELS = ("red", "blue", "green", "violet", "orange", "silver", "golden", "black", "white", "amber")


def gen_passkey(rng, units, n_queries):
    if n_queries > len(PASSKEY_LABELS):
        raise ValueError(f"passkey hides at most {len(PASSKEY_LABELS)} labelled keys per context")
    lines = [NOISE] * units
    labels = rng.sample(PASSKEY_LABELS, n_queries)
    keys = rng.sample(range(10000, 100000), n_queries)
    for pos, label, key in sorted(zip(_spread(units, n_queries), labels, keys), reverse=True):
        lines.insert(pos, f"The {label} pass key is {key}. Remember it. {key} is the {label} pass key.\n")
    turns = [{"input": f"What is the {label} pass key?", "answer": str(key)} for label, key in zip(labels, keys)]
    return "".join(lines), turns, []


SYLLABLES = ("ka", "lo", "mi", "ra", "ne", "tu", "so", "vi", "da", "pe", "zo", "ri")


DOC_CHARS, DOC_TOKENS = 1900, 540  # ~512-token documents, as in CacheBlend's setting (tokens: with headers)


def gen_multidoc_qa(rng, units, n_queries, length=None):
    # Shorter documents only where the context could not hold one ~512-token document per query.
    doc_chars = DOC_CHARS
    if length is not None and length < DOC_TOKENS * n_queries + 100:
        doc_chars = max(200, DOC_CHARS * (length - 100) // (DOC_TOKENS * n_queries))
    source = natural_text()
    names = set()
    while len(names) < units:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize())
    names = sorted(names)
    rng.shuffle(names)
    years = rng.sample(range(1900, 2100), units)
    docs = []
    for i, (name, year) in enumerate(zip(names, years)):
        start = rng.randrange(0, len(source) - doc_chars)
        filler = source[start:start + doc_chars]
        cut = rng.randrange(len(filler))
        fact = f"\nThe {name} project was started in the year {year}.\n"
        docs.append(f"Document [{i + 1}] ({name})\n{filler[:cut]}{fact}{filler[cut:]}")
    turns = [{"input": f"In which year was the {names[i]} project started?", "answer": str(years[i])}
             for i in _spread(units, n_queries)]
    return "\n\n".join(docs), turns, docs


TASKS = {t.name: t for t in (
    Task("kv", "Extract the value corresponding to the specified key in the JSON object below.\n\n"
         "{context}\n\n{input}", "{input}", 150, contains, gen_kv, (2, 12)),
    Task("prefix_suffix", "Below is a list of strings.\n\n{context}\n\n{input}", "{input}", 150, contains,
         gen_prefix_suffix, (2, 100)),
    Task("variable_tracking", "Memorize and track the chain(s) of variable assignment hidden in the "
         "following text.\n\n{context}\n{input}", "{input}", 30, all_names, gen_variable_tracking, (1, 40)),
    Task("math_find", "Below is a list of numbers.\n\n{context}\n\n{input}", "{input}", 5, first_int_equals,
         gen_math_find, (5, 300)),
    Task("passkey", "There is important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it.\n\n{context}\n\n{input}", "{input}", 15, first_int_equals, gen_passkey, (1, 40)),
    Task("multidoc_qa", "Answer the question using the documents below.\n\n{context}\n\nQuestion: {input}\n"
         "Answer with the year only.", "Question: {input}\nAnswer with the year only.", 40, contains,
         gen_multidoc_qa, (1, 4)),
)}

# SCBench's own files: which of our scorers and templates fit them.
SCBENCH_FILES = {"scbench_kv": "kv", "scbench_prefix_suffix": "prefix_suffix",
                 "scbench_vt": "variable_tracking", "scbench_mf": "math_find"}


def _count(tokenizer, text: str) -> int:
    return len(token_ids(tokenizer, text))


def generate_session(task: str, tokenizer, length: int, n_queries: int, seed: int, index: int = 0) -> Session:
    """One session whose context is the largest that fits in ``length`` tokens."""
    spec = TASKS[task]
    minimum, guess = spec.units

    sized = {"length": length} if "length" in inspect.signature(spec.generate).parameters else {}

    def build(units):
        rng = random.Random(f"{seed}:{task}:{length}:{index}")
        return spec.generate(rng, units, n_queries, **sized)

    def fits(units):
        return _count(tokenizer, build(units)[0]) <= length

    units = max(guess, minimum, n_queries)
    if not fits(max(minimum, n_queries)):
        raise ValueError(f"task {task!r}: {length} tokens cannot hold {n_queries} queries; "
                         f"raise --lengths or lower --queries")
    lo, hi = max(minimum, n_queries), units  # lo fits; grow hi until it does not
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    context, turns, chunks = build(lo)
    return Session(f"{task}-{length}-{seed}-{index}", task, length, context, turns, chunks)


def _truncate_middle(tokenizer, text: str, length: int) -> str:
    ids = token_ids(tokenizer, text)
    if len(ids) <= length:
        return text
    half = length // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[len(ids) - (length - half):])


def load_scbench_sessions(data_dir: str | Path, task: str, tokenizer, length: int, n_queries: int,
                          limit: int) -> list[Session]:
    """Sessions from SCBench's ``<data_dir>/scbench_<name>.jsonl``, contexts cut in the middle to
    ``length`` tokens as SCBench does. ``task`` is our name (``kv``, ``math_find``...)."""
    files = {ours: f"{theirs}.jsonl" for theirs, ours in SCBENCH_FILES.items()}
    if task not in files:
        raise ValueError(f"no SCBench scorer for task {task!r} here; SCBench files that load: "
                         f"{', '.join(sorted(f + '.jsonl' for f in SCBENCH_FILES))}")
    path = Path(data_dir) / files[task]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (--data-dir must hold SCBench's JSONL files)")
    sessions = []
    with open(path) as f:
        for line in f:
            if len(sessions) == limit:
                break
            rec = json.loads(line)
            context = rec["context"]
            if isinstance(context, list):  # scbench_mf stores the numbers as a list
                context = "[" + ", ".join(map(str, context)) + "]"
            turns = [{"input": t["input"], "answer": t["answer"]} for t in rec["multi_turns"][:n_queries]]
            sessions.append(Session(f"{task}-{length}-scbench-{rec['id']}", task, length,
                                    _truncate_middle(tokenizer, context, length), turns))
    return sessions

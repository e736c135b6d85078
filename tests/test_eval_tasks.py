"""Task generators, scorers, SCBench file loading and the two shared-context prompt modes."""

from __future__ import annotations

import json
import re

import pytest

from fastctx.eval.prompts import answer_text, messages, prompt_ids, teacher_forced_ids
from fastctx.eval.tasks import TASKS, all_names, contains, first_int_equals, generate_session, load_scbench_sessions


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [700, 3000])
def test_context_fills_its_token_budget_and_holds_every_answer(tokenizer, task, length):
    s = generate_session(task, tokenizer, length, 3, seed=1)
    size = n_tokens(tokenizer, s.context)
    assert 0.85 * length <= size <= length, size
    assert len(s.turns) == 3 and len({json.dumps(t) for t in s.turns}) == 3
    for turn in s.turns:
        answer = turn["answer"]
        if task == "math_find":
            numbers = [int(x) for x in re.findall(r"\d+", s.context)]
            stat = re.search(r"The (.+) number", turn["input"]).group(1)
            expected = {"largest": max(numbers), "smallest": min(numbers),
                        "median": sorted(numbers)[len(numbers) // 2]}[stat]
            assert int(answer) == expected and len(numbers) % 2 == 1
        elif task == "variable_tracking":
            value = re.search(r"value (\d+) in", turn["input"]).group(1)
            assert f"VAR {answer[0]} = {value} " in s.context
            for a, b in zip(answer, answer[1:]):  # the chain is in order: each hop after its source
                assert s.context.index(f"VAR {b} = VAR {a} ") > s.context.index(f"VAR {a} =")
        elif task == "prefix_suffix":
            p, q = re.findall(r"'(\w+)'", turn["input"])
            matches = [x for x in s.context.split("\n") if x.startswith(p) and x.endswith(q)]
            assert matches == [answer]
            assert sum(x.startswith(p) for x in s.context.split("\n")) >= 2  # a distractor shares it
        elif task == "multidoc_qa":
            name = re.search(r"the (\w+) project", turn["input"]).group(1)
            assert f"The {name} project was started in the year {answer}." in s.context
            assert len(s.chunks) >= 2 and "\n\n".join(s.chunks) == s.context
        else:
            assert str(answer) in s.context


def test_sessions_are_reproducible_from_the_seed(tokenizer):
    a = generate_session("kv", tokenizer, 800, 2, seed=3)
    assert a == generate_session("kv", tokenizer, 800, 2, seed=3)
    assert a.context != generate_session("kv", tokenizer, 800, 2, seed=4).context
    assert a.context != generate_session("kv", tokenizer, 800, 2, seed=3, index=1).context


def test_too_short_context_is_refused_with_what_to_change(tokenizer):
    with pytest.raises(ValueError, match="raise --lengths or lower --queries"):
        generate_session("kv", tokenizer, 60, 3, seed=0)
    with pytest.raises(ValueError, match="at most 5 distinct"):
        generate_session("math_find", tokenizer, 2000, 6, seed=0)


def test_scorers_follow_scbench():
    assert contains("the value is abc-1 ok", "abc-1") == 1 and contains("abc", "abc-1") == 0
    assert first_int_equals("It is 4213, not 7", "4213") == 1
    assert first_int_equals("7 or 4213", "4213") == 0 and first_int_equals("none", "1") == 0
    assert all_names("AAAAA and BBBBB", ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]) == 0.5


def test_multi_turn_prompts_extend_the_previous_turn_with_the_golden_answer(tokenizer):
    s = generate_session("passkey", tokenizer, 600, 3, seed=0)
    turns = [prompt_ids(tokenizer, s, t, "multi-turn") for t in range(3)]
    for prev, cur, t in zip(turns, turns[1:], (1, 2)):
        assert cur[:len(prev)] == prev  # the whole earlier prompt is a cacheable prefix
        assert answer_text(s.turns[t - 1]["answer"]) in tokenizer.decode(cur[len(prev):])
    assert [m["role"] for m in messages(s, 2, "multi-turn")] == ["user", "assistant", "user", "assistant", "user"]


def test_multi_request_prompts_share_the_context_and_differ_in_the_query(tokenizer):
    s = generate_session("kv", tokenizer, 600, 2, seed=0)
    a, b = (prompt_ids(tokenizer, s, t, "multi-request") for t in range(2))
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= n_tokens(tokenizer, s.context)
    assert s.turns[1]["input"].split('"')[1] in tokenizer.decode(b[shared - 5:])
    with pytest.raises(ValueError, match="unknown mode"):
        messages(s, 1, "multi_turn")


@pytest.mark.parametrize("task", ["multidoc_qa", "passkey"])
def test_rag_prompts_reorder_whole_chunks_that_the_connector_finds(tokenizer, task):
    from fastctx.cacheblend.chunks import split_on_separator
    from fastctx.cacheblend.params import BlendParams
    from fastctx.eval.prompts import rag_chunks

    s = generate_session(task, tokenizer, 2000, 3, seed=0)
    chunks = rag_chunks(tokenizer, s)
    assert len(chunks) >= 3
    sep = tokenizer.encode(BlendParams().separator, add_special_tokens=False)
    found = []
    for t in range(3):
        ids = prompt_ids(tokenizer, s, t, "rag")
        pieces = [ids[a:b] for a, b in split_on_separator(ids, sep, 1)]
        # The template's head, then every chunk (led by chunk t), whole; the question follows the last separator.
        assert pieces[1:] == chunks[t:] + chunks[:t]
        assert s.turns[t]["input"] in tokenizer.decode(ids[-60:])
        found.append(pieces[1])
    assert len({tuple(p) for p in found}) == 3  # each query led by another chunk: no shared prefix past the head


def test_teacher_forced_ids_put_the_golden_answer_after_the_prompt(tokenizer):
    s = generate_session("variable_tracking", tokenizer, 600, 1, seed=0)
    ids, start = teacher_forced_ids(tokenizer, s, 0)
    assert ids[:start] == prompt_ids(tokenizer, s, 0, "multi-request")
    assert tokenizer.decode(ids[start:]) == ", ".join(s.turns[0]["answer"])


def _write_scbench(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_scbench_files_load_and_contexts_are_cut_in_the_middle(tokenizer, tmp_path):
    long_context = "JSON data:\n{" + ", ".join(f'"k{i}": "v{i}"' for i in range(800)) + "}"
    _write_scbench(tmp_path / "scbench_kv.jsonl", [
        {"id": 7, "context": long_context, "multi_turns": [{"input": f"Key: k{i}", "answer": f"v{i}"}
                                                           for i in range(6)]},
        {"id": 8, "context": "short", "multi_turns": [{"input": "q", "answer": "a"}]}])
    _write_scbench(tmp_path / "scbench_mf.jsonl", [
        {"id": 0, "context": [5, 1, 9], "multi_turns": [{"input": "The largest number is", "answer": 9}]}])
    kv = load_scbench_sessions(tmp_path, "kv", tokenizer, 500, n_queries=5, limit=5)
    assert [s.id for s in kv] == ["kv-500-scbench-7", "kv-500-scbench-8"]
    assert len(kv[0].turns) == 5 and 480 <= n_tokens(tokenizer, kv[0].context) <= 505
    assert kv[0].context.startswith("JSON data:\n{") and kv[0].context.endswith('"v799"}')
    mf = load_scbench_sessions(tmp_path, "math_find", tokenizer, 500, n_queries=5, limit=1)
    assert mf[0].context == "[5, 1, 9]" and first_int_equals("9", mf[0].turns[0]["answer"])
    with pytest.raises(ValueError, match="no SCBench scorer for task 'passkey'"):
        load_scbench_sessions(tmp_path, "passkey", tokenizer, 500, 5, 1)
    with pytest.raises(FileNotFoundError, match="scbench_vt.jsonl not found"):
        load_scbench_sessions(tmp_path, "variable_tracking", tokenizer, 500, 5, 1)

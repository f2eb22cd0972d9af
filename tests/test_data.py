"""Prepare: file formats, text vs prompt/response masks, truncation, packing, stable ids and splits.

References are computed here, by hand, from the tokenizer fixture: never by calling the code
under test. Data files are written into tmp from the stdlib-docstring fixture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data import DataConfig, load_records
from pipeline.splits import load_split
from stages import cache_teacher, prepare

MAX_LEN = 48


def rows_of(run_dir, split: str = "train") -> dict[int, tuple[list[int], list[int]]]:
    ds, _ = load_split(run_dir, split)
    return {int(s): (list(map(int, i)), list(map(int, m))) for s, i, m in
            zip(ds["sample_id"], ds["input_ids"], ds["loss_mask"])}


def all_rows(run_dir) -> dict[int, tuple[list[int], list[int]]]:
    train, held = rows_of(run_dir, "train"), rows_of(run_dir, "eval")
    assert not set(train) & set(held), "a sequence is in both splits"
    return {**train, **held}


def knuth_eval(sample_id: int, fraction: float) -> bool:
    return (sample_id * 2654435761 % 2**32) / 2**32 < fraction


def text_docs(docstrings, n: int = 40) -> list[str]:
    # one line each, so the same records survive the .txt format (one record per line)
    return [" ".join(doc.split()) for _, doc in docstrings[:n]]


def expected_text(tokenizer, doc: str, max_length: int) -> tuple[list[int], list[int]]:
    ids = (tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id])[:max_length]
    return ids, [1] * (len(ids) - 1) + [0]


def write_source(tmp_path, fmt: str, docs: list[str]):
    import pandas as pd

    rows = [{"text": d, "other": i} for i, d in enumerate(docs)]
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(rows).to_parquet(path)
    elif fmt == "txt":
        path = tmp_path / "d.txt"
        path.write_text("\n".join(docs) + "\n")
    else:  # a directory of two jsonl files, read in sorted name order
        path = tmp_path / "dir"
        path.mkdir()
        half = len(rows) // 2
        for name, part in (("a.jsonl", rows[:half]), ("b.jsonl", rows[half:])):
            (path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt", "dir"])
def test_text_sources_tokenize_like_the_tokenizer(make_config, tokenizer, docstrings, tmp_path, fmt):
    docs = text_docs(docstrings)
    source = write_source(tmp_path, fmt, docs)
    cfg = make_config(f"data.source={source}", f"data.max_length={MAX_LEN}", "data.max_samples=0",
                      "data.eval_fraction=0.2")
    manifest = prepare.run(cfg)
    got = all_rows(cfg.run_dir)
    assert sorted(got) == list(range(len(docs)))
    for sid, doc in enumerate(docs):
        assert got[sid] == expected_text(tokenizer, doc, MAX_LEN), f"sample {sid}"
    assert manifest["mode"] == "text"
    assert {s for s in got if knuth_eval(s, 0.2)} == set(rows_of(cfg.run_dir, "eval"))


def pairs(docstrings, n: int = 30) -> list[tuple[str, str]]:
    return [(f"Explain {name}.", " ".join(doc.split())[:300]) for name, doc in docstrings[:n]]


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_prompt_response_loss_mask_is_exact(make_config, tokenizer, docstrings, tmp_path, chat):
    data = pairs(docstrings)
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in data))
    cfg = make_config(f"data.source={source}", "data.max_length=80", "data.max_samples=0",
                      "data.eval_fraction=0", f"data.chat_template={str(chat).lower()}")
    assert prepare.run(cfg)["mode"] == "prompt_response"
    got = rows_of(cfg.run_dir)
    eos = tokenizer.eos_token_id
    truncated = 0
    for sid, (prompt, response) in enumerate(data):
        if chat:  # the fixture's template, written out by hand
            head = f"<|begin|>user\n{prompt}<|endoftext|>\n<|begin|>assistant\n"
            head_ids = tokenizer.encode(head, add_special_tokens=False)
            tail_ids = tokenizer.encode(f"{response}<|endoftext|>\n", add_special_tokens=False) + [eos]
        else:
            head_ids = tokenizer.encode(prompt)  # "Explain x." then " " + the response (docs/data.md)
            tail_ids = tokenizer.encode(" " + response, add_special_tokens=False) + [eos]
        ids = (head_ids + tail_ids)[:80]
        is_response = [0] * len(head_ids) + [1] * len(tail_ids)
        mask = [is_response[i + 1] if i + 1 < len(ids) else 0 for i in range(len(ids))]
        truncated += len(head_ids) + len(tail_ids) > 80
        assert got[sid] == (ids, mask), f"sample {sid}"
        assert mask[len(head_ids) - 1] == 1 and (len(head_ids) < 2 or mask[len(head_ids) - 2] == 0)
    assert 0 < truncated < len(data), "the data should exercise both truncated and whole pairs"


def test_packing_cuts_the_document_stream(make_config, tokenizer, docstrings, tmp_path):
    docs = text_docs(docstrings, 25)
    source = write_source(tmp_path, "jsonl", docs)
    cfg = make_config(f"data.source={source}", "data.max_length=40", "data.max_samples=0", "data.packing=true",
                      "data.eval_fraction=0.25")
    prepare.run(cfg)
    got = all_rows(cfg.run_dir)
    pieces = [got[s][0] for s in sorted(got)]
    assert sorted(got) == list(range(len(pieces)))
    assert all(len(p) == 40 for p in pieces[:-1]) and 2 <= len(pieces[-1]) <= 40
    stream = [t for d in docs for t in tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]]
    flat = [t for p in pieces for t in p]
    assert flat == stream[:len(flat)] and len(stream) - len(flat) < 2
    for ids, mask in got.values():  # text: every position trains but each piece's last
        assert mask == [1] * (len(ids) - 1) + [0]


def test_sample_ids_and_fingerprint_are_stable(make_config, tmp_path):
    first = make_config("data.max_samples=60", "run.name=a")
    second = make_config("data.max_samples=60", "run.name=b")
    m1, m2 = prepare.run(first), prepare.run(second)
    assert all_rows(first.run_dir) == all_rows(second.run_dir)
    assert m1["splits"] == m2["splits"] and m1["tokenizer"] == m2["tokenizer"]
    on_disk = json.loads((first.run_dir / "data" / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["fingerprint"] == m1["splits"]["train"]["fingerprint"]
    assert set(rows_of(first.run_dir, "eval")) == {s for s in all_rows(first.run_dir) if knuth_eval(s, 0.05)}
    other = make_config("data.max_samples=60", "data.max_length=40", "run.name=c")
    assert prepare.run(other)["splits"]["train"]["fingerprint"] != m1["splits"]["train"]["fingerprint"]


def test_dataset_fingerprint_is_in_the_cache_identity(make_config):
    cfg = make_config("data.max_samples=10", "data.max_length=24", "cache.splits=[train]")
    data_manifest = prepare.run(cfg)
    cache_manifest = cache_teacher.run(cfg)["train"]
    assert cache_manifest.identity["dataset"] == data_manifest["splits"]["train"]["fingerprint"]
    assert cache_manifest.identity["tokenizer"] == data_manifest["tokenizer"]


def test_missing_fields_is_one_line_naming_columns(make_config, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(ConfigError) as info:
        prepare.run(make_config(f"data.source={source}"))
    message = str(info.value)
    assert "\n" not in message and "question" in message and "answer" in message
    assert "'text'" in message and "'prompt'" in message and "'response'" in message
    with pytest.raises(ConfigError, match="'text'"):  # an explicit mode whose field is missing
        prepare.run(make_config(f"data.source={source}", "data.mode=text", "run.name=t"))
    assert not (make_config(f"data.source={source}").run_dir / "data").exists(), "nothing written"


def test_offline_hub_id_is_one_line_error():
    with pytest.raises(ConfigError) as info:
        load_records(DataConfig(source="no-such-org/no-such-dataset-kdcache"))
    message = str(info.value)
    assert "\n" not in message and "no-such-org/no-such-dataset-kdcache" in message


def test_empty_directory_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        load_records(DataConfig(source=str(tmp_path / "empty")))


def test_position_mask_convention_on_a_tiny_example():
    """loss_mask[i] = 1 iff token i+1 is a response token (a hand-written case)."""
    from pipeline.data import to_position_mask

    target = np.array([0, 0, 0, 1, 1, 1], np.uint8)  # 3 prompt tokens then 3 response tokens
    assert to_position_mask(target).tolist() == [0, 0, 1, 1, 1, 0]


def prepare_pairs(make_config, tmp_path, pairs_: list[tuple[str, str]], *overrides: str, name: str = "pairs"):
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs_))
    cfg = make_config(f"data.source={source}", "data.max_samples=0", "data.eval_fraction=0", "data.max_length=64",
                      f"run.name={name}", *overrides)
    prepare.run(cfg)
    return rows_of(cfg.run_dir)


@pytest.mark.parametrize("separator", [" ", "", " | "])
def test_prompt_and_response_are_joined_as_documented(make_config, tokenizer, tmp_path, separator):
    """data.response_separator goes between prompt and response unless the prompt ends or the response
    starts with whitespace: 'where to' + 'get' reads 'where to get' (it read 'where toget')."""
    cases = [("where to", "get", f"where to{separator}get"), ("Q:\n", "42", "Q:\n42"),
             ("Say it", " again", "Say it again"), ("Name one. ", "Ada", "Name one. Ada")]
    got = prepare_pairs(make_config, tmp_path, [(p, r) for p, r, _ in cases],
                        f"data.response_separator='{separator}'", name=f"sep{len(separator)}")
    for sid, (prompt, _, text) in enumerate(cases):
        ids, mask = got[sid]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        head = len(tokenizer.encode(prompt))  # the prompt's own tokens come first, untouched
        assert ids[:head] == tokenizer.encode(prompt) and mask[head - 1] == 1 and sum(mask[:head - 1]) == 0
        response = tokenizer.decode(ids[head:], skip_special_tokens=True)
        assert prompt + response == text  # the trained part is exactly the joined response
    assert tokenizer.decode(got[0][0][:-1]) == f"where to{separator}get"  # not 'where toget' (unless asked)


def write_records(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_eval_source_is_the_eval_split(make_config, tokenizer, docstrings, tmp_path, capsys):
    """data.eval_source: every record of it (ids: its record indices) is the eval split, data.source is all
    train; its file is part of prepare's inputs; the summary says where the eval split came from."""
    docs = text_docs(docstrings, 30)
    train = write_records(tmp_path / "train.jsonl", [{"text": d} for d in docs[:20]])
    held = write_records(tmp_path / "held.jsonl", [{"text": d} for d in docs[20:]])
    cfg = make_config(f"data.source={train}", f"data.eval_source={held}", "data.max_samples=0",
                      f"data.max_length={MAX_LEN}", "data.eval_fraction=0.5")
    manifest = prepare.run(cfg)
    assert manifest["eval_from"] == "data.eval_source"
    assert rows_of(cfg.run_dir, "train") == {i: expected_text(tokenizer, d, MAX_LEN) for i, d in enumerate(docs[:20])}
    assert rows_of(cfg.run_dir, "eval") == {i: expected_text(tokenizer, d, MAX_LEN) for i, d in enumerate(docs[20:])}
    assert "sequences (train 20, eval 10 from data.eval_source)" in capsys.readouterr().out
    write_records(held, [{"text": d} for d in docs[21:]])  # the eval file edited: another input
    with pytest.raises(ConfigError, match="--force"):
        prepare.run(cfg)
    prepare.run(cfg, force=True)
    assert len(rows_of(cfg.run_dir, "eval")) == 9
    wrong = write_records(tmp_path / "wrong.jsonl", [{"question": "a"}])
    with pytest.raises(ConfigError, match="question"):  # the eval file lacks the train data's field
        prepare.run(make_config(f"data.source={train}", f"data.eval_source={wrong}", "run.name=wrong"))


def test_prepare_ends_with_a_summary_paragraph(make_config, tmp_path, capsys):
    cfg = make_config("data.max_samples=30", "data.max_length=40")
    manifest = prepare.run(cfg)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prepare:")]
    assert len(out) == 1, out
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    trained = sum(s["trained_tokens"] for s in manifest["splits"].values())
    size = sum(f.stat().st_size for f in (cfg.run_dir / "data" / "train").rglob("*") if f.is_file()) + \
        sum(f.stat().st_size for f in (cfg.run_dir / "data" / "eval").rglob("*") if f.is_file())
    n = manifest["splits"]["train"]["sequences"] + manifest["splits"]["eval"]["sequences"]
    assert out[0].startswith(f"prepare: {n} sequences (train ")
    assert f"{tokens:,} tokens ({trained:,} trained)" in out[0] and "truncated to data.max_length=40" in out[0]
    per_token = float(out[0].split(" bytes/token")[0].rsplit(" ", 1)[1])
    assert per_token == pytest.approx(size / tokens, abs=0.06)

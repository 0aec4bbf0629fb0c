"""LLaVA JSON / JSONL reading, weighted mixtures, structural record checks."""

from __future__ import annotations

import json

import pytest

from cumo_megatron.data.records import (
    DataError,
    DataSource,
    Mixture,
    ProblemKind,
    RawRecord,
    approx_text_length,
    check_record,
    load_file,
    parse_source_spec,
)


def rec(i, image=True, q="What is this?", a="A red square."):
    """A well-formed LLaVA record."""
    out = {"id": f"r{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]}
    if image:
        out["image"] = f"img_{i}.png"
    return out


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def kinds(raw):
    return [p.kind for p in check_record(raw)]


def test_json_list_and_jsonl_read_the_same_records(tmp_path):
    records = [rec(0), rec(1, image=False), rec(2)]
    a = load_file(write_json(tmp_path / "a.json", records))
    b = load_file(write_jsonl(tmp_path / "b.jsonl", records))
    # A .json file holding JSON lines is read as JSON lines too (some published files are).
    c = load_file(write_jsonl(tmp_path / "c.json", records))
    for loaded in (a, b, c):
        assert [r.data for r in loaded] == records
        assert [r.index for r in loaded] == [0, 1, 2]
        assert [r.record_id for r in loaded] == ["r0", "r1", "r2"]
    assert [r.line for r in b] == [1, 2, 3]


def test_bad_json_line_is_a_record_with_an_error_the_rest_stay_usable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [rec(0), '{"id": "broken", "conversations": [', "", rec(1)])
    loaded = load_file(path)
    assert len(loaded) == 3  # blank line ignored
    assert loaded[1].error and loaded[1].data is None and loaded[1].line == 2
    (problem,) = check_record(loaded[1])
    assert problem.kind == ProblemKind.BAD_JSON
    assert str(path) in str(problem) and "record 1" in str(problem) and "line 2" in str(problem)
    assert check_record(loaded[0]) == [] and check_record(loaded[2]) == []


def test_unparseable_json_list_and_wrong_top_level_raise_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,,}]')
    with pytest.raises(DataError, match="bad.json.*not valid JSON"):
        load_file(bad)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    with pytest.raises(DataError, match="scalar.json.*expected a list"):
        load_file(scalar)
    with pytest.raises(DataError, match="not found"):
        load_file(tmp_path / "absent.json")


@pytest.mark.parametrize(
    "data, kind",
    [
        ("just a string", ProblemKind.MALFORMED),
        ({"id": "x"}, ProblemKind.MALFORMED),
        ({"id": "x", "conversations": []}, ProblemKind.MALFORMED),
        ({"id": "x", "conversations": [{"from": "human"}]}, ProblemKind.MALFORMED),
        ({"id": "x", "conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, ProblemKind.MALFORMED),
        ({"id": "x", "image": 7, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]}, ProblemKind.MALFORMED),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, ProblemKind.ROLE_ORDER),
        ({"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}, ProblemKind.ROLE_ORDER),
        ({"id": "x", "conversations": [{"from": "human", "value": "q"}]}, ProblemKind.ROLE_ORDER),
        ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, ProblemKind.MISSING_IMAGE_TOKEN),
        ({"id": "x", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}, ProblemKind.UNEXPECTED_IMAGE_TOKEN),
        ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "<image>"}]}, ProblemKind.UNEXPECTED_IMAGE_TOKEN),
    ],
)
def test_each_structural_problem_is_detected_and_located(data, kind):
    raw = RawRecord("train.json", 5, data)
    problems = check_record(raw)
    assert kind in [p.kind for p in problems]
    text = str(problems[0])
    assert "train.json record 5" in text
    if isinstance(data, dict):
        assert "id='x'" in text


def test_good_records_pass_including_multi_image_and_text_only():
    assert kinds(RawRecord("f", 0, rec(0))) == []
    assert kinds(RawRecord("f", 1, rec(1, image=False))) == []
    two = {"id": "m", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two"}]}
    assert kinds(RawRecord("f", 2, two)) == []
    multi_turn = rec(3)
    multi_turn["conversations"] += [{"from": "human", "value": "more?"}, {"from": "gpt", "value": "no"}]
    assert kinds(RawRecord("f", 3, multi_turn)) == []


def test_parse_source_spec_weights_and_colon_paths():
    assert parse_source_spec("a.json") == DataSource("a.json", 1.0)
    assert parse_source_spec("a.json:0.25") == DataSource("a.json", 0.25)
    assert parse_source_spec("/data/x:y/a.json:3") == DataSource("/data/x:y/a.json", 3.0)
    assert parse_source_spec("/data/x:y/a.json") == DataSource("/data/x:y/a.json", 1.0)
    with pytest.raises(DataError, match="weight"):
        parse_source_spec("a.json:-1")


def test_mixture_weights_are_deterministic_and_exact(tmp_path):
    a = write_json(tmp_path / "a.json", [rec(i) for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [rec(100 + i, image=False) for i in range(8)])
    c = write_json(tmp_path / "c.json", [rec(200 + i) for i in range(4)])
    m = Mixture.from_specs([f"{a}:0.5", f"{b}:2", f"{c}:0"], image_folder="imgs", seed=3)
    ids = [m[i].record_id for i in range(len(m))]
    assert len(m) == 5 + 16
    from_a = [x for x in ids if int(x[1:]) < 100]
    assert len(set(from_a)) == 5  # a fixed half, no repeats
    from_b = [x for x in ids if 100 <= int(x[1:]) < 200]
    assert sorted(from_b) == sorted([f"r{100 + i}" for i in range(8)] * 2)
    assert not [x for x in ids if int(x[1:]) >= 200]
    again = Mixture.from_specs([f"{a}:0.5", f"{b}:2", f"{c}:0"], image_folder="imgs", seed=3)
    assert [again[i].record_id for i in range(len(again))] == ids
    other = Mixture.from_specs([f"{a}:0.5", f"{b}:2"], seed=4)
    assert {other[i].record_id for i in range(5)} != set(from_a)  # the seed picks the half
    # Modality and lengths for the sampler.
    assert m.has_image().tolist() == [True] * 5 + [False] * 16
    lengths = m.lengths(tokens_per_image=100)
    assert lengths[0] == approx_text_length(m[0].data) + 100 and lengths[-1] == approx_text_length(m[len(m) - 1].data)
    assert m.image_folder(0) == "imgs"
    # Every file once for a validator, whatever the weights.
    assert [len(r) for _, r in m.file_records()] == [10, 8, 4]


def test_mixture_per_source_image_folder_and_empty_mixture(tmp_path):
    a = write_json(tmp_path / "a.json", [rec(0)])
    m = Mixture([DataSource(str(a), 1.0, image_folder="own")], default_image_folder="default")
    assert m.image_folder(0) == "own"
    with pytest.raises(DataError, match="selects no records"):
        Mixture([DataSource(str(a), 0.0)])


def test_parser_failures_are_data_errors_or_bad_records_never_crashes(tmp_path):
    """Nesting beyond the recursion limit and integers beyond Python's digit limit break the JSON
    parser with RecursionError / ValueError: a whole file raises DataError, a JSON line is bad_json."""
    deep = write_json(tmp_path / "deep.json", [])
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match=r"deep.json: not valid JSON \(nested too deeply") as info:
        load_file(deep)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    lines = write_jsonl(tmp_path / "lines.jsonl", [rec(0), "[" * 100000 + "]" * 100000, '{"id": ' + "9" * 5000 + "}", rec(1)])
    loaded = load_file(lines)
    assert [r.record_id for r in loaded] == ["r0", None, None, "r1"]
    assert "nested too deeply" in loaded[1].error and "ValueError" in loaded[2].error and loaded[2].line == 3
    assert [kinds(r) for r in loaded] == [[], [ProblemKind.BAD_JSON], [ProblemKind.BAD_JSON], []]
    with pytest.raises(DataError, match="is a directory"):
        load_file(tmp_path)


def test_a_record_too_deep_to_inspect_is_malformed():
    nested: list = []
    for _ in range(100000):  # built in Python: deeper than any repr or recursive check can go
        nested = [nested]
    raw = RawRecord("x.json", 3, {"id": nested, "conversations": [nested, {"from": "gpt", "value": "a"}]})
    (problem,) = check_record(raw)
    assert problem.kind == ProblemKind.MALFORMED and "x.json record 3" in str(problem)
    assert len(raw.record_id) < 100  # a nested id is named briefly, not printed in full

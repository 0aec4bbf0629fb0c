"""LLaVA's question files read into question records, the asked text built as LLaVA's scripts build it
(the expected strings are written out by hand from model_vqa_loader / _science / _mmbench)."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from cumo_megatron.data.records import DataError
from cumo_megatron.evaluation.questions import decode_image, load_questions, with_suffix

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_lines_keep_their_text_and_suffix_once(tmp_path):
    qfile = _jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": f"Is there a dog in the image?\n{SHORT}", "category": "random"},
        {"question_id": "x", "image": "b.jpg", "text": "What is it?"},
    ])
    qs = load_questions(qfile, image_folder=tmp_path / "imgs", suffix=SHORT)
    assert [q.question_id for q in qs] == [1, "x"]
    assert qs[0].text == f"Is there a dog in the image?\n{SHORT}"  # already there: not added again
    assert qs[1].text == f"What is it?\n{SHORT}"
    assert qs[1].prompt == "What is it?"  # the file's text, as model_vqa_loader records it
    assert qs[0].image == tmp_path / "imgs" / "a.jpg" and qs[0].category == "random"
    assert load_questions(qfile)[0].image == tmp_path / "a.jpg"  # default folder: the file's


def test_seed_lines_give_their_options(tmp_path):
    text = f"How many cats?\nA. one\nB. two\nC. three\nD. four\n{LETTER}"
    qfile = _jsonl(tmp_path / "seed.jsonl", [{"question_id": "101", "image": "s.jpg", "text": text,
                                              "category": "Instances Counting"}])
    (q,) = load_questions(qfile, suffix=LETTER)
    assert q.options == ("one", "two", "three", "four") and q.text == text


def test_scienceqa_conversations(tmp_path):
    records = [
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A map.\nWhich state is highlighted?\nA. Utah\nB. Ohio"},
            {"from": "gpt", "value": "A"}]},
        {"id": "7", "conversations": [{"from": "human", "value": "Which word is a noun?\nA. run\nB. cat"},
                                      {"from": "gpt", "value": "B"}]},
    ]
    qfile = tmp_path / "llava_test_CQM-A.json"
    qfile.write_text(json.dumps(records))
    img, txt = load_questions(qfile, image_folder=tmp_path, suffix=LETTER)
    assert img.text == f"Context: A map.\nWhich state is highlighted?\nA. Utah\nB. Ohio\n{LETTER}"
    assert img.prompt == "<image>\n" + img.text and img.image == tmp_path / "4/image.png"
    assert not txt.has_image and txt.prompt == f"Which word is a noun?\nA. run\nB. cat\n{LETTER}"


def _png_b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mmbench(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["index", "question", "hint", "A", "B", "C", "D", "answer",
                                                    "category", "image"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_mmbench_options_hint_and_rotations(tmp_path):
    tsv = _mmbench(tmp_path / "mmbench_dev.tsv", [
        {"index": 12, "question": "What colour?", "hint": "A toy.", "A": "red", "B": "blue", "C": "green", "D": "",
         "answer": "B", "category": "attribute", "image": _png_b64((255, 0, 0))},
        {"index": 13, "question": "Is it big?", "hint": "nan", "A": "yes", "B": "no", "C": "", "D": "",
         "answer": "A", "category": "size", "image": _png_b64((0, 0, 255))},
    ])
    one = load_questions(tsv, suffix=LETTER)
    assert [q.question_id for q in one] == [12, 13]
    assert one[0].prompt == "A toy.\nWhat colour?\nA. red\nB. blue\nC. green"  # LLaVA's cur_prompt: no suffix
    assert one[0].text == one[0].prompt + "\n" + LETTER
    assert one[1].prompt == "Is it big?\nA. yes\nB. no"  # 'nan' hint left out, options stop at the first empty
    rounds = load_questions(tsv, suffix=LETTER, all_rounds=True)
    assert [(q.question_id, q.round_id) for q in rounds] == [(12, 0), (12, 1), (12, 2), (13, 0), (13, 1)]
    assert rounds[1].prompt == "A toy.\nWhat colour?\nA. blue\nB. green\nC. red"
    assert rounds[2].answer_fields == {"round_id": 2, "options": ["green", "red", "blue"],
                                       "option_char": ["C", "A", "B"]}
    target = decode_image(rounds[0], tmp_path / "img0")
    assert Image.open(target).convert("RGB").getpixel((1, 1)) == (255, 0, 0)


def test_mme_repeated_ids_are_two_questions(tmp_path):
    qfile = _jsonl(tmp_path / "llava_mme.jsonl", [
        {"question_id": "code/0020.png", "image": "code/0020.png", "text": "Is the output 3?\nPlease answer yes or no."},
        {"question_id": "code/0020.png", "image": "code/0020.png", "text": "Is the output 4?\nPlease answer yes or no."},
    ])
    a, b = load_questions(qfile)
    assert a.key != b.key


def test_bad_files_name_the_file_and_record(tmp_path):
    with pytest.raises(DataError, match="question file not found"):
        load_questions(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not JSON"):
        load_questions(bad)
    no_text = _jsonl(tmp_path / "no_text.jsonl", [{"question_id": 1, "image": "a.jpg"}])
    with pytest.raises(DataError, match=r"no_text.jsonl line 1: no 'text' field"):
        load_questions(no_text)
    twice = _jsonl(tmp_path / "twice.jsonl", [{"question_id": 1, "text": "a"}, {"question_id": 1, "text": "a"}])
    with pytest.raises(DataError, match="appears twice"):
        load_questions(twice)
    tsv = tmp_path / "m.tsv"
    tsv.write_text("index\tquestion\n1\tq\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['image'\]"):
        load_questions(tsv)


def test_with_suffix():
    assert with_suffix("Q", None) == "Q"
    assert with_suffix("Q", "S.") == "Q\nS."
    assert with_suffix("Q\nS.\n", "S.") == "Q\nS.\n"

"""The quality suite's tasks: held-out test items really are unseen, and each checker tells right from wrong."""

import json
import re

import pytest

from bench.quality_tasks import CAPITALS, NEGATIVE, POSITIVE, TASKS, make_tasks


def words(rows):
    return {w.strip(".,;:()'\"").lower() for r in rows for w in r["messages"][0]["content"].split()}


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in make_tasks()}


def test_every_task_has_100_test_items_and_reference_answers_pass(tasks):
    assert set(tasks) == set(TASKS)
    for task in tasks.values():
        assert len(task.rows["test"]) >= 100
        for split, rows in task.rows.items():
            for row in rows:
                assert task.check(row["messages"][1]["content"], row), (task.name, split, row)


def test_generation_is_deterministic():
    assert [t.rows for t in make_tasks(seed=3)] == [t.rows for t in make_tasks(seed=3)]
    assert make_tasks(["json"], seed=3)[0].rows != make_tasks(["json"], seed=4)[0].rows


def test_test_countries_never_appear_in_training(tasks):
    rows = tasks["capitals"].rows
    seen = {r["answer"] for split in ("train", "valid") for r in rows[split]}
    assert not seen & {r["answer"] for r in rows["test"]}
    asked = lambda split: {re.fullmatch(r".* of (.+)[?.]", r["messages"][0]["content"]).group(1) for r in rows[split]}
    assert asked("test") <= set(CAPITALS) and not (asked("train") | asked("valid")) & asked("test")


def test_test_reviews_use_unseen_adjectives(tasks):
    rows = tasks["sentiment"].rows
    train_adjectives = words(rows["train"]) & set(POSITIVE + NEGATIVE)
    test_adjectives = words(rows["test"]) & set(POSITIVE + NEGATIVE)
    assert train_adjectives and test_adjectives and not train_adjectives & test_adjectives


def test_test_people_have_unseen_names_and_cities(tasks):
    rows = tasks["json"].rows
    seen = {(r["answer"]["name"], r["answer"]["city"]) for r in rows["train"]}
    names, cities = {n for n, _ in seen}, {c for _, c in seen}
    assert all(r["answer"]["name"] not in names and r["answer"]["city"] not in cities for r in rows["test"])


@pytest.mark.parametrize("answer,ok", [
    ("CAPITAL: Tashkent", True), ("capital: Tashkent", False), ("The capital is Tashkent.", False),
    ("CAPITAL: Samarkand", False), ("CAPITAL: Tashkent\nCAPITAL: Paris", False),
])
def test_capital_checker(answer, ok):
    task = make_tasks(["capitals"])[0]
    assert task.check(answer, {"answer": "Tashkent"}) is ok


@pytest.mark.parametrize("answer,ok", [
    ("negative", True), ("This review is negative.", True), ("positive", False), ("positive or negative", False), ("", False),
])
def test_sentiment_checker(answer, ok):
    assert make_tasks(["sentiment"])[0].check(answer, {"answer": "negative"}) is ok


@pytest.mark.parametrize("answer,ok", [
    (json.dumps({"name": "Zoe", "age": 46, "city": "Quito"}), True),
    ('{"name": "Zoe", "age": "46", "city": "Quito"}', False),  # age must be a number
    ('{"name": "Zoe", "age": 46, "city": "Quito", "job": "x"}', False),  # only the given keys
    ('Sure: {"name": "Zoe", "age": 46, "city": "Quito"}', False),  # nothing but the JSON
])
def test_json_checker(answer, ok):
    assert make_tasks(["json"])[0].check(answer, {"answer": {"name": "Zoe", "age": 46, "city": "Quito"}}) is ok


@pytest.mark.parametrize("answer,ok", [("🍕🎸", True), ("🍕 yum", False), ("I love pizza", False), ("", False), ("42 🍕", False)])
def test_emoji_checker(answer, ok):
    assert make_tasks(["emoji"])[0].check(answer, {}) is ok

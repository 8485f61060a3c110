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


# --- the suite's selection logic (bench/quality.py): rates chosen on validation, test scored once ---------------

def run_stub(valid_acc, loss, test_acc, calls):
    """A stand-in for a training run: its result and a loader of a scorer that records which split it scored."""
    def scorer(task, rows):
        split = "test" if rows[0] is task.rows["test"][0] else "valid"
        assert len(rows) == {"test": 5, "valid": 4}[split]  # the suite's sizes, not the whole split
        calls.append((valid_acc, loss, split))
        return {"accuracy": test_acc if split == "test" else valid_acc}
    return {"trainable": 1, "train_time_s": 0.0, "train_loss": loss}, lambda: scorer


def test_sweep_chooses_on_validation_and_scores_only_the_chosen_run_on_test(tasks):
    from bench.quality import sweep

    task, cfg, calls = tasks["capitals"], {"valid": 4, "test": 5}, []
    # rate 1: best on test but worse on validation; rates 2 and 3 tie on validation, 3 has the lower loss
    runs = {1: (0.5, 0.1, 1.0), 2: (0.75, 0.9, 0.2), 3: (0.75, 0.3, 0.4)}
    out = sweep("m", [1, 2, 3], lambda lr: run_stub(*runs[lr], calls), task, cfg)
    assert out["chosen"]["learning_rate"] == 3 and out["chosen"]["test"]["accuracy"] == 0.4
    assert [c for c in calls if c[2] == "test"] == [(0.75, 0.3, "test")]
    assert sum(c[2] == "valid" for c in calls) == 3 and all("test" not in r for r in out["sweep"] if r["learning_rate"] != 3)


def test_one_rate_needs_no_validation_pass(tasks):
    from bench.quality import sweep

    calls = []
    out = sweep("m", [1], lambda lr: run_stub(0.5, 0.1, 0.7, calls), tasks["capitals"], {"valid": 4, "test": 5})
    assert [c[2] for c in calls] == ["test"] and out["chosen"]["test"]["accuracy"] == 0.7


def test_ablations_train_each_picked_entry_at_its_own_multiple_of_the_rate(tasks, monkeypatch, tmp_path):
    import bench.quality as quality

    calls, trained = [], []

    def train(model_path, task, setting, lr, cfg, folder):
        trained.append((setting["intervention"], lr))
        return run_stub(0.5, 0.1, 0.5, calls)

    monkeypatch.setattr(quality, "train_loreft", train)
    out = quality.ablate("m", tasks["capitals"], 0.002, {"test": 5}, tmp_path, [], only="lobireft")
    assert trained == [("lobireft", 0.002), ("lobireft", 0.02), ("lobireft", 0.06)]
    assert [r["label"] for r in out] == ["intervention=lobireft", "intervention=lobireft, lr x10", "intervention=lobireft, lr x30"]
    assert [c[2] for c in calls] == ["test"] * 3


@pytest.mark.parametrize("argv,message", [
    (["--rates-from", "x.json"], "--rates-from needs --ablations"),
    (["--only", "rank"], "--only needs --ablations"),
    (["--tasks", "emoji,poetry"], "unknown task(s) poetry"),
])
def test_bad_arguments_fail_before_any_model_loads(argv, message, capsys):
    from bench.quality import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_ablations_take_the_rate_of_an_earlier_run_of_the_same_suite(tmp_path, tasks):
    from bench.quality import SUITES, earlier_results

    cfg = {k: v for k, v in SUITES["default"].items() if k != "tasks"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"config": cfg, "tasks": [{"task": "capitals", "loreft": {"chosen": {"learning_rate": 0.01}}}]}))
    assert earlier_results(str(path), [tasks["capitals"]], cfg)["capitals"]["loreft"]["chosen"]["learning_rate"] == 0.01
    with pytest.raises(SystemExit, match="no result for task"):
        earlier_results(str(path), [tasks["json"]], cfg)
    with pytest.raises(SystemExit, match="suite"):
        earlier_results(str(path), [tasks["capitals"]], {**cfg, "steps": 1})

"""`loreft serve` through the real openai client: answers equal `loreft generate`, concurrency, errors, disconnects.

One server (a `loreft serve` subprocess on a free loopback port) serves the tiny model and two adapters
for the whole module; the references come from `loreft generate` run in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import mlx.core as mx
import mlx_lm
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from loreft import ReftConfig, attach  # noqa: E402
from loreft.adapter import save_adapter  # noqa: E402
from loreft.cli import main as cli_main  # noqa: E402
from loreft.demo import DEMO_PROMPT_TEMPLATE  # noqa: E402
from loreft.serve import StopText  # noqa: E402

KEY = "test-key"
PROMPTS = ["Who are you?", "What is two plus two?", "Hi", "Tell me about the ocean", "Name a colour"]
CHAT = {"prompt_template": None, "chat": True}
TEMPLATE = {"prompt_template": DEMO_PROMPT_TEMPLATE, "chat": False}


def _make_adapter(model_dir, path, formatting, seed):
    """An adapter with non-trivial random weights, so its answers differ from the base model's."""
    model, _ = mlx_lm.load(str(model_dir))
    reft = attach(model, ReftConfig(layers="all", rank=4, positions="f3+l3"))
    mx.random.seed(seed)
    reft.load_parameters({k: 0.5 * mx.random.normal(v.shape) for k, v in reft.parameters().items()})
    save_adapter(reft, path, base_model=str(model_dir), extra={"formatting": formatting})
    return str(path)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_adapters")
    return {"chat": _make_adapter(tiny_model_dir, root / "chat", CHAT, 1),
            "tmpl": _make_adapter(tiny_model_dir, root / "tmpl", TEMPLATE, 2),
            "late": _make_adapter(tiny_model_dir, root / "late", CHAT, 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, tmp_path_factory):
    """Base URL of a `loreft serve` subprocess serving the base model and the chat and tmpl adapters."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    cmd = [sys.executable, "-m", "loreft.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
           "--adapter", f"chat={adapters['chat']}", "--adapter", f"tmpl={adapters['tmpl']}", "--api-key", KEY]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def loreft_generate(*args) -> str:
    """stdout of `loreft generate ...` run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["generate", *args]) == 0
    return out.getvalue()


def reference(model_dir, adapter, prompt, max_tokens, raw=False):
    """`loreft generate`'s greedy answer for one prompt with one adapter."""
    args = ["--adapter", adapter, "--model", str(model_dir), "--prompt", prompt, "--max-tokens", str(max_tokens)]
    text = loreft_generate(*args, *(["--raw"] if raw else []))
    assert text.endswith("\n")
    return text[:-1]


def chat(client, model, prompt, max_tokens=16, stream=False, **kw):
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].message.content
    pieces = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, **kw)
    return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)


# ---------------------------------------------------------------------------------------------------
# Answers


def test_models_lists_the_base_and_the_adapters(client, tiny_model_dir):
    assert [m.id for m in client.models.list().data] == [str(tiny_model_dir), "chat", "tmpl"]


@pytest.mark.parametrize("name", ["chat", "tmpl"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_answer_equals_loreft_generate(client, adapters, tiny_model_dir, name, stream):
    for prompt in PROMPTS[:2]:
        expected = reference(tiny_model_dir, adapters[name], prompt, 16)
        assert chat(client, name, prompt, stream=stream) == expected


def test_base_model_uses_the_tokenizers_chat_template_and_differs_from_the_adapters(client, adapters, tiny_model_dir):
    prompt = PROMPTS[0]
    # `generate --base` formats with the chat adapter's formatting, which is the tokenizer's chat template
    out = loreft_generate("--adapter", adapters["chat"], "--model", str(tiny_model_dir), "--prompt", prompt,
                          "--max-tokens", "16", "--base")
    base_line, adapter_line = out.rstrip("\n").split("\n")
    assert base_line.startswith("[base] ") and adapter_line.startswith("[adapter] ")
    answers = {m: chat(client, m, prompt) for m in (str(tiny_model_dir), "chat", "tmpl")}
    assert answers[str(tiny_model_dir)] == base_line[len("[base] "):]
    assert answers["chat"] == adapter_line[len("[adapter] "):]
    assert len(set(answers.values())) == 3  # three models, three different answers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_completions_take_the_raw_prompt(client, adapters, tiny_model_dir, stream):
    prompt = "Once upon a time"
    expected = reference(tiny_model_dir, adapters["tmpl"], prompt, 12, raw=True)
    r = client.completions.create(model="tmpl", prompt=prompt, max_tokens=12, temperature=0, stream=stream)
    text = "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text
    assert text == expected


def test_usage_and_finish_reason(client, tiny_tokenizer):
    from loreft.generate import format_prompt
    from loreft.data import encode_prompt

    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0)
    prompt_tokens = len(encode_prompt(tiny_tokenizer, format_prompt(tiny_tokenizer, "Hi", CHAT)))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == prompt_tokens + 5
    chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_strings_cut_the_answer(client):
    full = chat(client, "tmpl", PROMPTS[1], max_tokens=24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    expected = full[: full.index(stop)]
    for stream in (False, True):
        assert chat(client, "tmpl", PROMPTS[1], max_tokens=24, stream=stream, stop=[stop, "never seen"]) == expected


@pytest.fixture(scope="module")
def long_answer(client):
    """('chat', 'Hi')'s first 1000 tokens: the model does not stop on its own before them."""
    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=1000,
                                       temperature=0)
    assert r.choices[0].finish_reason == "length"
    return r.choices[0].message.content


def test_a_stop_string_ends_the_generation_too(server, client, long_answer):
    stop = long_answer[20:23]
    steps = _health(server)["steps"]
    assert chat(client, "chat", "Hi", max_tokens=2000, stop=stop) == long_answer[: long_answer.index(stop)]
    _wait_idle(server)
    assert _health(server)["steps"] - steps < 1000  # not the 2000 asked for


def test_token_ids_outside_the_vocabulary_are_refused(server, client):
    r = _post(server, "/v1/completions", {"model": "tmpl", "prompt": [1, 2, 10**7], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    ok = client.completions.create(model="tmpl", prompt=[1, 2, 3], max_tokens=2, temperature=0)
    assert ok.usage.prompt_tokens == 3


def test_seeded_sampling_repeats_and_differs_from_greedy(client):
    def sample(seed):
        r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                           temperature=1.5, seed=seed)
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), chat(client, "chat", "Hi")}) > 1


def test_concurrent_streams_all_finish_and_match_their_sequential_answers(client, server, tiny_model_dir):
    models = [str(tiny_model_dir), "chat", "tmpl"]
    jobs = [(models[i % 3], f"{PROMPTS[i % len(PROMPTS)]} {'!' * (i // 5)}", 20 + i) for i in range(16)]
    sequential = [chat(client, m, p, max_tokens=n) for m, p, n in jobs]
    results: list = [None] * len(jobs)

    def run(i):
        m, p, n = jobs[i]
        try:
            results[i] = chat(client, m, p, max_tokens=n, stream=True)
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == sequential
    assert httpx.get(server + "/health").json()["peak_running"] > 1  # served together, not one at a time


# ---------------------------------------------------------------------------------------------------
# Bad requests: OpenAI-style errors, and the server keeps serving


def _post(server, path, body, key=KEY):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server + path, content=content, headers=headers, timeout=60)


GOOD = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD_REQUESTS = {
    "unknown model": ({**GOOD, "model": "nope"}, 404, "model"),
    "missing model": ({k: v for k, v in GOOD.items() if k != "model"}, 400, "model"),
    "malformed json": ('{"model": "chat", "messages": [', 400, None),
    "not an object": ("[1, 2]", 400, None),
    "missing messages": ({"model": "chat"}, 400, "messages"),
    "empty messages": ({**GOOD, "messages": []}, 400, "messages"),
    "messages not a list": ({**GOOD, "messages": "Hi"}, 400, "messages"),
    "bad role": ({**GOOD, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    "content not text": ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "negative max_tokens": ({**GOOD, "max_tokens": -3}, 400, "max_tokens"),
    "zero max_tokens": ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    "huge max_tokens": ({**GOOD, "max_tokens": 10**9}, 400, "max_tokens"),
    "fractional max_tokens": ({**GOOD, "max_tokens": 1.5}, 400, "max_tokens"),
    "prompt longer than the context": ({**GOOD, "messages": [{"role": "user", "content": "ocean " * 3000}]}, 400, "messages"),
    "temperature not a number": ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    "temperature too high": ({**GOOD, "temperature": 9}, 400, "temperature"),
    "top_p zero": ({**GOOD, "top_p": 0}, 400, "top_p"),
    "seed not an integer": ({**GOOD, "seed": "x"}, 400, "seed"),
    "stream not a bool": ({**GOOD, "stream": "yes"}, 400, "stream"),
    "stop not strings": ({**GOOD, "stop": [1]}, 400, "stop"),
    "n above 1": ({**GOOD, "n": 2}, 400, "n"),
    "multi-turn on a template adapter": ({**GOOD, "model": "tmpl", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]},
        400, "messages"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, client, case):
    body, status, param = BAD_REQUESTS[case]
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert chat(client, "chat", "Hi", max_tokens=2)  # still serving


def test_bad_completion_prompt_and_the_openai_client_raises_its_own_errors(server, client):
    r = _post(server, "/v1/completions", {"model": "tmpl", "prompt": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=10**6)


def test_api_key_is_checked(server):
    assert _post(server, "/v1/chat/completions", GOOD, key="wrong").status_code == 401
    r = httpx.get(server + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_route_is_a_json_404(server):
    r = httpx.get(server + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()


# ---------------------------------------------------------------------------------------------------
# Disconnects and adapters loaded at run time


def _health(server) -> dict:
    return httpx.get(server + "/health").json()


def _wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while _health(server)["running"] != 0:
        assert time.time() < deadline, "a request kept generating"
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_client_that_disconnects_frees_its_slot(server, long_answer, stream):
    """A request that would run 2000 decode steps (at least 1000) ends soon after its client goes away."""
    body = {**GOOD, "max_tokens": 2000, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    steps = _health(server)["steps"]
    with httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as c:
        if stream:
            with c.stream("POST", server + "/v1/chat/completions", json=body, headers=headers) as r:
                lines = r.iter_lines()  # held: dropping the iterator would close the connection
                assert next(lines).startswith("data: ")
                deadline = time.time() + 30
                while _health(server)["running"] == 0:  # wait until it is generating
                    assert time.time() < deadline
                    time.sleep(0.05)
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting after 1 s
                c.post(server + "/v1/chat/completions", json=body, headers=headers)
    _wait_idle(server)
    assert 0 < _health(server)["steps"] - steps < 1000  # it ran, and stopped long before the answer could end


def test_load_an_adapter_at_run_time(server, client, adapters, tiny_model_dir, tmp_path):
    r = _post(server, "/v1/adapters", {"path": adapters["late"], "name": "late"})
    assert r.status_code == 200, r.text
    assert "late" in [m.id for m in client.models.list().data]
    assert chat(client, "late", PROMPTS[0]) == reference(tiny_model_dir, adapters["late"], PROMPTS[0], 16)

    assert _post(server, "/v1/adapters", {"path": adapters["late"], "name": "late"}).status_code == 400  # name taken
    missing = _post(server, "/v1/adapters", {"path": str(tmp_path / "none")})
    assert missing.status_code == 400 and "reft_config.json" in missing.json()["error"]["message"]
    wrong = tmp_path / "wrong"  # an adapter for a model of another size
    shutil.copytree(adapters["late"], wrong)
    meta = json.loads((wrong / "reft_config.json").read_text())
    meta["hidden_size"] *= 2
    (wrong / "reft_config.json").write_text(json.dumps(meta))
    r = _post(server, "/v1/adapters", {"path": str(wrong)})
    assert r.status_code == 400 and "hidden size" in r.json()["error"]["message"]
    assert chat(client, "chat", "Hi", max_tokens=2)


# ---------------------------------------------------------------------------------------------------
# Pieces without a server


def test_stop_text_holds_back_a_possible_stop_and_cuts_at_the_first():
    s = StopText(["END", "xy"])
    assert s.next("abc", final=False) == ("a", False)  # 'bc' could start 'END'
    assert s.next("abcE", final=False) == ("b", False)
    assert s.next("abcEN", final=False) == ("c", False)
    assert s.next("abcENDxy", final=False) == ("", True)
    assert StopText([]).next("abc", final=False) == ("abc", False)
    assert StopText(["zz"]).next("abcz", final=True) == ("abcz", False)


def test_serve_rejects_bad_adapters_before_loading_a_model(tmp_path, adapters, capsys):
    assert cli_main(["serve", "--adapter", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loreft: error:") and "reft_config.json" in err and "\n" not in err
    path = adapters["chat"]
    assert cli_main(["serve", "--model", "not-loaded", "--adapter", f"a={path}", "--adapter", f"a={path}"]) == 2
    assert "same name" in capsys.readouterr().err


@pytest.fixture(autouse=True, scope="module")
def _no_proxy():
    """The clients talk to 127.0.0.1 directly, whatever proxy the environment names."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower() in ("http_proxy", "https_proxy", "all_proxy")}
    yield
    os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------
# The TransformerLab chat task (chat/): adapter lookup, the page's streaming logic (no gradio needed), task.yaml


def _chat_module(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "chat" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"loreft_chat_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chat_page_streams_the_servers_answer(client):
    page = _chat_module("chat_page")
    steps = list(page.stream_reply(client, "chat", PROMPTS[0], [], max_tokens=16))
    assert steps[-1] == chat(client, "chat", PROMPTS[0])
    assert all(later.startswith(earlier) for earlier, later in zip(steps, steps[1:]))  # it grows as tokens come
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    messages = history + [{"role": "user", "content": PROMPTS[1]}]
    expected = client.chat.completions.create(model="chat", messages=messages, max_tokens=16, temperature=0)
    assert list(page.stream_reply(client, "chat", PROMPTS[1], history, max_tokens=16))[-1] == expected.choices[0].message.content
    assert list(page.stream_reply(client, "chat", PROMPTS[1], [["Hi", "Hello"]], max_tokens=16))[-1] == expected.choices[0].message.content
    # a template adapter answers the last message alone, and says so
    last = list(page.stream_reply(client, "tmpl", PROMPTS[1], history, max_tokens=16))[-1]
    assert last == chat(client, "tmpl", PROMPTS[1]) + page.SINGLE_PROMPT_NOTE


def test_chat_task_finds_a_jobs_saved_adapter(tmp_path, adapters):
    run = _chat_module("run")
    workspace = tmp_path / "workspace"
    saved = workspace / "experiments" / "alpha" / "jobs" / "12" / "models" / "12_loreft"
    shutil.copytree(adapters["chat"], saved)
    (workspace / "experiments" / "alpha" / "jobs" / "12" / "models" / "12_other").mkdir()  # not an adapter
    shutil.copytree(adapters["tmpl"], workspace / "experiments" / "beta" / "jobs" / "7" / "models" / "7_a")
    shutil.copytree(adapters["tmpl"], workspace / "experiments" / "beta" / "jobs" / "7" / "models" / "7_b")
    for ref in ("12", "alpha/12", "12_loreft", str(saved)):
        assert run.resolve_adapter(ref, str(workspace)) == saved
    for ref, words in (("13", "no ReFT adapter"), ("7", "several"), ("a/b/c", "neither"), (str(tmp_path), "not a ReFT")):
        with pytest.raises(run.ChatTaskError, match=words):
            run.resolve_adapter(ref, str(workspace))
    with pytest.raises(run.ChatTaskError, match="TFL_WORKSPACE_DIR"):
        run.resolve_adapter("12", None)
    cmd = run.serve_command("", saved, 8001)
    assert cmd[1:4] == ["-m", "loreft.cli", "serve"] and f"adapter={saved}" in cmd and "--model" not in cmd
    with pytest.raises(run.ChatTaskError):
        run.serve_command("", None, 8001)


def test_chat_task_yaml_is_a_task_the_app_accepts():
    """Only the keys the app's task.yaml schema allows; every parameter reaches run.py through its env var."""
    from pathlib import Path

    import yaml

    folder = Path(__file__).resolve().parents[1] / "chat"
    task = yaml.safe_load((folder / "task.yaml").read_text())
    allowed = {"name", "resources", "envs", "setup", "run", "github_repo_url", "github_repo_dir", "github_repo_branch",
               "parameters", "sweeps", "minutes_requested"}
    assert set(task) <= allowed and task["run"] == "python chat/run.py" and task["setup"] == "bash chat/setup.sh"
    sources = (folder / "run.py").read_text() + (folder / "setup.sh").read_text()
    for name, p in task["parameters"].items():
        assert p["env_var"] in sources, name
    entry = json.loads((folder / "gallery-entry.json").read_text())
    import re

    pattern = entry["url_patterns"][0]
    assert re.search(pattern["regex"], "* Running on local URL:  http://0.0.0.0:7860").group(pattern["group"]) == "http://0.0.0.0:7860"


def test_continuous_batcher_rows_joining_mid_decode_match_one_at_a_time(tiny_model_dir, adapters):
    """Requests for two adapters and the base model, some joining while others decode, in a batch of at most 4:
    each gets exactly the tokens it gets alone (generate.stream_responses)."""
    from loreft.adapter import load_adapter
    from loreft.data import encode_prompt
    from loreft.generate import ContinuousBatcher, Request, stream_responses
    from loreft.job import load_model

    model, tok = load_model(str(tiny_model_dir), "float32")
    refts = [None, load_adapter(model, adapters["chat"]), load_adapter(model, adapters["tmpl"])]
    jobs = [(refts[i % 3], encode_prompt(tok, PROMPTS[i % len(PROMPTS)] + " x" * i), 6 + 3 * i) for i in range(9)]
    alone = [[r.token for r in stream_responses(model, tok, ids, reft, max_tokens=n) if r.finish_reason != "stop"]
             for reft, ids, n in jobs]

    out = [[] for _ in jobs]
    finished = [threading.Event() for _ in jobs]

    def emitter(i):
        def emit(token, finish_reason):
            if token is not None:
                out[i].append(token)
            if finish_reason is not None:
                finished[i].set()
        return emit

    batcher = ContinuousBatcher(model, tok, max_batch=4, prefill_batch=2).start()
    try:
        for i in range(3):
            batcher.submit(Request(jobs[i][1], jobs[i][0], jobs[i][2], emitter(i)))
        deadline = time.time() + 60
        while batcher.steps < 3:  # the first ones are decoding when the rest arrive
            assert time.time() < deadline
            time.sleep(0.001)
        for i in range(3, len(jobs)):
            batcher.submit(Request(jobs[i][1], jobs[i][0], jobs[i][2], emitter(i)))
        for event in finished:
            assert event.wait(60)
    finally:
        batcher.close()
    assert out == alone
    assert 1 < batcher.peak <= 4

"""``gptforge serve`` at TP=2, talked to with the real ``openai`` client: greedy completions
equal ``gptforge generate``'s, a stream concatenates to the same text, bad fields are a 400 naming
them, 16 concurrent requests all complete, and the server outlives every request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from gptforge.launcher.cli.main import main
from gptforge.parallel.context import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # starts ranks
PROMPTS = ["def main(", "import os\nimport sys\n\nclass Config", "x"]


@pytest.fixture(scope="module")
def server(converted):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptforge.launcher.cli.main", "serve", "--checkpoint",
         str(converted["llama"]), "--port", str(port), "--model-name", "tiny-llama",
         "--nproc-per-node", "2", "--parallel.tensor_model_parallel_size=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                assert json.loads(answer.read())["status"] == "ok"
                break
        except OSError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
    yield base
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def generated(converted, tmp_path_factory):
    """``gptforge generate``'s greedy completions of PROMPTS (one at a time, 12 tokens)."""
    out = {}
    for i, prompt in enumerate(PROMPTS):
        path = tmp_path_factory.mktemp("gen") / f"{i}.json"
        assert main(["generate", "--checkpoint", str(converted["llama"]), "--prompt", prompt,
                     "--max-new-tokens", "12", "--greedy", "--quiet",
                     "--output-json", str(path)]) == 0
        out[prompt] = json.loads(path.read_text())[0]["completion"]
    return out


def test_models_and_greedy_completions_equal_generate(client, generated):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    for prompt, want in generated.items():
        answer = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12,
                                           temperature=0)
        assert answer.choices[0].text == want
        assert answer.choices[0].finish_reason in ("length", "stop")
        assert answer.usage.completion_tokens <= 12


def test_a_stream_concatenates_to_the_same_text(client, generated):
    prompt = PROMPTS[1]
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == generated[prompt]


def test_a_stop_sequence_cuts_the_text(client, generated):
    want = generated[PROMPTS[0]]
    stop = want[3:5]
    answer = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0, stop=[stop])
    assert answer.choices[0].text == want[:want.find(stop)]
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("fields, param", [({"temperature": -1}, "temperature"),
                                           ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"),
                                           ({"max_tokens": 10_000}, "max_tokens"),
                                           ({"top_p": 0}, "top_p"), ({"stop": [""]}, "stop")])
def test_a_bad_field_is_a_400_naming_it(client, fields, param):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-llama", prompt="x", **fields)
    assert err.value.status_code == 400 and err.value.body["param"] == param


def test_another_model_name_is_a_404_naming_it(client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert err.value.body["param"] == "model" and "tiny-llama" in err.value.body["message"]


def test_a_body_that_is_not_json_is_a_400(server):
    request = urllib.request.Request(f"{server}/v1/completions", data=b"{not json",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == "body"


def test_sixteen_concurrent_requests_all_complete(client):
    answers = [None] * 16

    def ask(i):
        answers[i] = client.completions.create(
            model="tiny-llama", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8,
            temperature=0 if i % 2 else 0.8, seed=i, extra_body={"top_k": 20})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(a is not None and a.choices[0].finish_reason in ("length", "stop")
               for a in answers)
    greedy = {a.choices[0].text for i, a in enumerate(answers) if i % 2 and i % 3 == 1}
    assert len(greedy) == 1  # the same greedy prompt, batched with others: the same text


def test_a_port_in_use_is_refused_before_the_model_loads(converted, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        start = time.monotonic()
        assert main(["serve", "--checkpoint", str(converted["llama"]), "--port", str(port)]) == 2
    assert time.monotonic() - start < 5
    assert f"--port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

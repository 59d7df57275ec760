"""`ikv serve` as a client meets it: the real server on 127.0.0.1, the real SmolLM2, the official `openai` client.

Fast tests check request handling without a model; the rest start `ikv serve` as a subprocess (once per module, plus
the kill -9 pair and the 12k-token one, which is `slow`) and talk to it over HTTP.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from infinitekv.errors import IKVError
from infinitekv.server import (APIError, archive_failure, conversation_dir, parse_chat_request, plan_turn,
                               request_json, secret_number, spawn_server)

openai = pytest.importorskip("openai")
KEY = "test-key-13"
MODEL = "smollm2-135m"
ANSWER = 12  # max_tokens that holds "The number is 12345" (SmolLM2 writes one token per digit)


def question(number: int) -> str:
    return f"The secret number is {number}. What is the secret number? Answer with the number only."


def raw_post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {KEY}", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def assert_one_line_error(text: str, *needles: str) -> dict:
    assert text.endswith("\n") and text.count("\n") == 1, text
    error = json.loads(text)["error"]
    assert error["message"] and error["code"], error
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


# ---- without a model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "..", ".", ".hidden", "a/b", "a\\b", "/etc", "", "x" * 129, "a\x00b",
                                 "é", "a b"])
def test_conversation_ids_that_could_leave_the_archives_directory_are_refused(tmp_path, bad):
    with pytest.raises(APIError) as caught:
        conversation_dir(tmp_path, bad)
    assert caught.value.status == 400 and caught.value.code == "invalid_conversation_id"


def test_a_symlink_planted_in_the_archives_directory_is_refused(tmp_path):
    (tmp_path / "archives").mkdir()
    (tmp_path / "archives" / "planted").symlink_to(tmp_path)
    assert conversation_dir(tmp_path / "archives", "fine-id_1.x") == tmp_path / "archives" / "fine-id_1.x"
    with pytest.raises(APIError) as caught:
        conversation_dir(tmp_path / "archives", "planted")
    assert caught.value.status == 400


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "invalid_json"),
    (b"[]", 400, "invalid_json"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
    (b'{"model": "smollm2-135m", "messages": []}', 400, "invalid_messages"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "tool", "content": "x"}]}', 400, "invalid_messages"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "assistant", "content": "x"}]}', 400, "invalid_messages"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400,
     "invalid_value"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999}', 400,
     "invalid_value"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}', 400,
     "invalid_value"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}',
     400, "invalid_value"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400,
     "unsupported_parameter"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
     "unsupported_content"),
])
def test_bad_requests_get_the_right_status_and_code(body, status, code):
    with pytest.raises(APIError) as caught:
        parse_chat_request(body, None, MODEL, 2048)
    assert (caught.value.status, caught.value.code) == (status, code), caught.value.message


def test_a_good_request_is_parsed_with_openai_defaults():
    body = json.dumps({"model": MODEL, "messages": [{"role": "developer", "content": "be brief"},
                                                    {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "stop": "\n", "max_completion_tokens": 7, "conversation_id": "c1"}).encode()
    chat = parse_chat_request(body, "c1", MODEL, 2048)
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert (chat.stop, chat.max_tokens, chat.temperature, chat.top_p, chat.stream) == (("\n",), 7, 0.0, 1.0, False)
    with pytest.raises(APIError) as caught:
        parse_chat_request(body, "other", MODEL, 2048)
    assert caught.value.status == 400


def test_only_a_continuation_of_the_stored_conversation_is_accepted():
    stored = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "long answer", "returned": "long"}]
    new = {"role": "user", "content": "b"}
    assert plan_turn(stored, [*stored[:1], {"role": "assistant", "content": "long "}, new], "c") == ([], "b")
    earlier, text = plan_turn(stored, [*stored, {"role": "system", "content": "s"}, new], "c")
    assert earlier == [{"role": "system", "content": "s"}] and text == "b"
    for sent in ([stored[0], {"role": "assistant", "content": "other"}, new], [new], stored[:1]):
        with pytest.raises(APIError) as caught:
            plan_turn(stored, sent, "c")
        assert caught.value.status == 409


def test_archive_failures_map_to_statuses():
    assert archive_failure(IKVError("disk full while committing archive x; free some space"), "c").status == 507
    assert archive_failure(IKVError("manifest x is corrupted (bad crc); restore the archive"), "c").status == 500
    assert archive_failure(IKVError("archive x is in use by another process (pid 1); stop it"), "c").status == 409


def ikv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinitekv", *args], capture_output=True, text=True, timeout=120)


def test_serving_beyond_localhost_without_an_api_key_is_refused(tmp_path):
    done = ikv("serve", "--host", "0.0.0.0", "--archives", str(tmp_path / "c"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--api-key" in done.stderr and done.stderr.count("ikv: error:") == 1, done.stderr


def test_a_taken_port_is_reported_in_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        done = ikv("serve", "--port", str(taken.getsockname()[1]), "--archives", str(tmp_path / "c"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot listen" in done.stderr, done.stderr


# ---- the real server ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    spawned = spawn_server(["--archives", str(root / "conversations"), "--port", "0", "--api-key", KEY,
                            "--max-body-bytes", "200000"], root / "server.log")
    spawned.archives = root / "conversations"
    try:
        yield spawned
    finally:
        spawned.stop()


def client_for(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.mark.smollm2
def test_models_health_and_the_api_key(server):
    client = client_for(server.url)
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=1)


@pytest.mark.smollm2
def test_a_non_streamed_answer_without_a_conversation(server):
    number = secret_number(90, 0)
    before = sorted(server.archives.iterdir())
    reply = client_for(server.url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question(number)}], max_tokens=ANSWER)
    assert str(number) in reply.choices[0].message.content
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    done = reply.choices[0].finish_reason
    assert 0 < reply.usage.completion_tokens <= ANSWER and (done == "stop" or reply.usage.completion_tokens == ANSWER)
    assert sorted(server.archives.iterdir()) == before  # no id: an in-RAM archive, nothing on disk


@pytest.mark.smollm2
def test_a_streamed_answer_then_a_follow_up_resumed_from_the_archive(server):
    client = client_for(server.url)
    number = secret_number(91, 0)
    messages = [{"role": "user", "content": question(number)}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=ANSWER, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers={"X-Conversation-Id": "streamed"})
    deltas, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    answer = "".join(deltas)
    assert str(number) in answer and len([d for d in deltas if d]) > 1  # token by token, not in one piece
    assert 0 < usage.completion_tokens <= ANSWER and (finish == "stop" or usage.completion_tokens == ANSWER)
    assert (server.archives / "streamed" / "MANIFEST").exists()

    second = secret_number(91, 1)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question(second)}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=ANSWER,
                                                           extra_body={"conversation_id": "streamed"})
    reply = raw.parse()
    assert str(second) in reply.choices[0].message.content
    assert reply.usage.prompt_tokens_details.cached_tokens == usage.total_tokens  # everything before: not re-read
    assert reply.usage.prefill_tokens == int(raw.headers["x-ikv-prefill-tokens"]) < 64
    assert reply.usage.prompt_tokens == usage.total_tokens + reply.usage.prefill_tokens


@pytest.mark.smollm2
def test_a_stop_string_ends_the_answer_and_the_conversation_continues_from_it(server):
    client = client_for(server.url)
    messages = [{"role": "user", "content": question(secret_number(92, 0))}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stop=[" "],
                                           extra_headers={"X-Conversation-Id": "stopped"})
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and text and " " not in text
    # the client sends back what it got, cut at the stop string: the server matches it to the stored turn
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": question(secret_number(92, 1))}]
    follow = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1,
                                            extra_headers={"X-Conversation-Id": "stopped"})
    assert follow.usage.prompt_tokens_details.cached_tokens == reply.usage.total_tokens


@pytest.mark.smollm2
def test_a_client_that_leaves_mid_stream_leaves_the_conversation_at_its_last_turn(server):
    client = client_for(server.url)
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question(secret_number(93, 0))}], max_tokens=4,
        extra_headers={"X-Conversation-Id": "left"})
    messages = [{"role": "user", "content": question(secret_number(93, 0))},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Write a long story about a lighthouse."}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=400, stream=True,
                                            extra_headers={"X-Conversation-Id": "left"})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                           extra_headers={"X-Conversation-Id": "left"})
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens


@pytest.mark.smollm2
def test_conversation_ids_that_traverse_are_refused_and_nothing_is_written(server, tmp_path):
    client = client_for(server.url)
    before = sorted(p.name for p in server.archives.parent.iterdir())
    for bad in ("../escape", "..", "a/b", ".hidden"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                           extra_headers={"X-Conversation-Id": bad})
        assert caught.value.status_code == 400 and "conversation id" in caught.value.message
    assert sorted(p.name for p in server.archives.parent.iterdir()) == before


@pytest.mark.smollm2
def test_bad_json_oversized_bodies_and_unknown_paths_get_one_line_json_errors(server):
    status, text = raw_post(server.url, "/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [')
    assert status == 400 and assert_one_line_error(text, "not valid JSON")["code"] == "invalid_json"
    status, text = raw_post(server.url, "/v1/chat/completions", b"x" * 300_000)
    assert status == 413 and assert_one_line_error(text, "larger than")["code"] == "request_too_large"
    status, text = raw_post(server.url, "/v1/nothing", b"{}")
    assert status == 404 and assert_one_line_error(text, "no such endpoint")
    status, text = raw_post(server.url, "/v1/chat/completions", b"{}", headers={"Authorization": "Bearer nope"})
    assert status == 401 and assert_one_line_error(text, "API key")


@pytest.mark.smollm2
def test_a_corrupt_archive_is_a_one_line_500_and_a_mismatch_a_409(server):
    client = client_for(server.url)
    messages = [{"role": "user", "content": question(secret_number(94, 0))}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                           extra_headers={"X-Conversation-Id": "broken"})
    with pytest.raises(openai.ConflictError) as caught:  # a request that does not repeat the stored turn
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "other"}], max_tokens=1,
                                       extra_headers={"X-Conversation-Id": "broken"})
    assert "differs" in caught.value.message
    manifest = server.archives / "broken" / "MANIFEST"
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    manifest.write_bytes(bytes(data))
    messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "and now?"}]
    status, text = raw_post(server.url, "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": messages, "max_tokens": 1}).encode(), headers={"X-Conversation-Id": "broken"})
    assert status == 500, text
    assert assert_one_line_error(text, "conversation 'broken'", "corrupted")["code"] == "archive_corrupt"


@pytest.mark.smollm2
def test_a_server_killed_mid_generation_resumes_from_the_last_committed_turn(tmp_path):
    archives = tmp_path / "conversations"
    args = ["--archives", str(archives), "--port", "0"]
    first_server = spawn_server(args, tmp_path / "first.log")
    try:
        client = client_for(first_server.url)
        messages = [{"role": "user", "content": question(secret_number(95, 0))}]
        turn1 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                               extra_headers={"X-Conversation-Id": "durable"})
        messages += [{"role": "assistant", "content": turn1.choices[0].message.content},
                     {"role": "user", "content": question(secret_number(95, 1))}]
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=400, stream=True,
                                                extra_headers={"X-Conversation-Id": "durable"})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first_server.process.kill()  # SIGKILL, mid-generation
                first_server.process.wait()
                break
        with pytest.raises(openai.APIConnectionError):
            for _ in stream:
                pass
    finally:
        first_server.stop()
    second_server = spawn_server(args, tmp_path / "second.log")
    try:
        turn2 = client_for(second_server.url).chat.completions.create(
            model=MODEL, messages=messages, max_tokens=ANSWER, extra_headers={"X-Conversation-Id": "durable"})
    finally:
        second_server.stop()
    assert turn2.usage.prompt_tokens_details.cached_tokens == turn1.usage.total_tokens
    assert str(secret_number(95, 1)) in turn2.choices[0].message.content


@pytest.mark.smollm2
@pytest.mark.slow
def test_a_12k_token_document_is_read_once_and_the_follow_up_answered_from_the_archive(smollm2, tmp_path):
    from infinitekv.needles import passkey

    needle = passkey(smollm2.tokenizer, 12000, 0.5)
    spawned = spawn_server(["--archives", str(tmp_path / "conversations"), "--port", "0"], tmp_path / "server.log")
    try:
        client = client_for(spawned.url)
        messages = [{"role": "user", "content": f"{needle.document}\n\n{needle.question}"}]
        progress, deltas, health_mid_prefill = [], [], None
        with client.chat.completions.with_streaming_response.create(
                model=MODEL, messages=messages, max_tokens=20, stream=True,
                extra_headers={"X-Conversation-Id": "document"}) as response:
            for line in response.iter_lines():
                if line.startswith(": prefill"):
                    progress.append(line)
                    if health_mid_prefill is None:  # the event loop is free while the worker reads the document
                        health_mid_prefill = request_json(spawned.url, "GET", "/health", timeout=10)
                elif line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    deltas.append(delta or "")
        first = "".join(deltas)
        assert needle.answer in first, first
        # every chunk but the last (which the answer's generate reads) is reported: the exact phase in long chunks,
        # then the retrieval phase in chunks of chunk_size
        totals = {int(line.split("/")[1].split()[0]) for line in progress}
        assert len(totals) == 1 and len(progress) == totals.pop() - 1 >= 5, progress
        assert health_mid_prefill[0] == 200
        messages += [{"role": "assistant", "content": first},
                     {"role": "user", "content": "Say the magic number again. Answer with the number."}]
        follow = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                                extra_headers={"X-Conversation-Id": "document"})
    finally:
        spawned.stop()
    assert follow.usage.prompt_tokens_details.cached_tokens > 12000
    assert follow.usage.prefill_tokens < 64
    assert needle.answer in follow.choices[0].message.content

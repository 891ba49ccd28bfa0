"""The openai generation client against a real local HTTP server that speaks vLLM's /v1/completions and
injects faults (429, 500, dropped sockets, timeouts, short logprobs); retries, failover, concurrency."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from model.generation import Generation, SamplingConfig, make_generator
from model.generation.openai_client import parse_completion
from model.generation.retry import backoff_delay


# ------------------------------------------------------------------------------------------------------
# openai: a real HTTP server on 127.0.0.1 that speaks vLLM's /v1/completions and injects faults


def _completion(prompt: list[int], max_tokens: int, k: int, as_ids: bool = True, with_token_ids: bool = True,
                top_entries: int | None = None) -> dict:
    """A deterministic vLLM-shaped reply: answer = prompt[-1]+1, +2, ...; 'stop' when it reaches a
    multiple of 7 (the stop token is included), else 'length'."""
    ids = []
    t = prompt[-1]
    while len(ids) < max_tokens:
        t += 1
        ids.append(t)
        if t % 7 == 0:
            break
    finish = "stop" if ids[-1] % 7 == 0 else "length"
    name = (lambda i: f"token_id:{i}") if as_ids else (lambda i: f"tok{i}")
    n_top = k if top_entries is None else top_entries
    top = []
    for i in ids:
        # the sampled token first (as vLLM adds it), then the top-k: candidates i, i+100, i+200, ...
        entry = {name(i): -0.1}
        for r in range(n_top):
            entry[name(i + 100 * r)] = -0.1 - 0.5 * r
        top.append(entry)
    choice = {
        "index": 0,
        "text": " ".join(f"w{i}" for i in ids),
        "logprobs": {
            "text_offset": list(range(len(ids))),
            "token_logprobs": [-0.1] * len(ids),
            "tokens": [name(i) for i in ids],
            "top_logprobs": top if k > 0 else [{name(i): -0.1} for i in ids],
        },
        "finish_reason": finish,
        "stop_reason": None,
    }
    if with_token_ids:
        choice["token_ids"] = ids
    return {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids)}}


class FaultServer:
    """Per prompt (keyed by its first token), a script of actions for consecutive attempts:
    'ok', '429', '500', '400', 'drop' (close the socket without replying), 'sleep:S' (then ok),
    'strings' (ok, tokens as strings), 'short' (ok, too few top-logprobs). After the script: 'ok'.
    ``GET /v1/models`` lists ``models`` (503 when ``models_down``); each GET is recorded in ``gets``."""

    def __init__(self, scripts: dict[int, list[str]] | None = None, default: str = "ok", latency: float = 0.0,
                 models: tuple[str, ...] = ("m",), models_down: bool = False):
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.default = default
        self.latency = latency
        self.models = tuple(models)
        self.models_down = models_down
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.gets: list[dict] = []  # {"path", "auth"} per GET
        self.inflight = 0
        self.max_inflight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    script = server.scripts.setdefault(body["prompt"][0], [])
                    action = script.pop(0) if script else server.default
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    server.handle(self, body, action)
                finally:
                    with server.lock:
                        server.inflight -= 1

            def do_GET(self):
                with server.lock:
                    server.gets.append({"path": self.path, "auth": self.headers.get("Authorization")})
                if self.path.rstrip("/") != "/v1/models":
                    status, reply = 404, {"error": {"message": "not found"}}
                elif server.models_down:
                    status, reply = 503, {"error": {"message": "injected 503"}}
                else:
                    status = 200
                    reply = {"object": "list", "data": [{"id": n, "object": "model"} for n in server.models]}
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def handle(self, h: BaseHTTPRequestHandler, body: dict, action: str) -> None:
        if self.latency:
            time.sleep(self.latency)
        if action == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if action.startswith("sleep:"):
            time.sleep(float(action.split(":")[1]))
            action = "ok"
        if action in ("429", "500", "400", "503"):
            payload = json.dumps({"error": {"message": f"injected {action}", "type": "x", "code": int(action)}}).encode()
            h.send_response(int(action))
            if action == "429":
                h.send_header("Retry-After", "0")
        else:
            as_ids = action != "strings" and bool(body.get("return_tokens_as_token_ids"))
            reply = _completion(body["prompt"], body["max_tokens"], body.get("logprobs") or 0, as_ids=as_ids,
                                with_token_ids=action != "strings" and bool(body.get("return_token_ids")),
                                top_entries=2 if action == "short" else None)
            payload = json.dumps(reply).encode()
            h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FaultServer()
    yield srv
    srv.close()


def _free_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


FAST = dict(backoff_base=0.01, backoff_max=0.05, timeout=5.0)


def test_openai_parses_vllm_shape(server):
    gen = make_generator("openai", "m", base_url=server.url, **FAST)
    assert gen.identity == "openai:m"
    prompts = [[10, 11, 12], [20, 21], [40, 1]]
    outs = gen.generate(prompts, SamplingConfig(max_new_tokens=5, topk_logprobs=3))
    assert outs[0].token_ids == [13, 14] and outs[0].finished  # 14 = 2 * 7: stop, included
    assert outs[1].token_ids == [22, 23, 24, 25, 26] and not outs[1].finished
    g = outs[0]
    assert g.topk_ids.tolist() == [[13, 113, 213], [14, 114, 214]]  # the extra sampled entry merged, k kept
    assert np.allclose(g.topk_logprobs, [[-0.1, -0.6, -1.1]] * 2)
    assert g.topk_ids.dtype == np.int32 and g.topk_logprobs.dtype == np.float32
    body = server.requests[0]
    assert body["prompt"] in prompts and body["logprobs"] == 3 and body["max_tokens"] == 5
    assert body["temperature"] == 0.0 and body["return_tokens_as_token_ids"] is True
    assert all(o.meta["attempts"] == 1 for o in outs)
    # parse_completion alone, without token_ids: ids from the "token_id:N" tokens
    reply = _completion([5], 3, 2, with_token_ids=False)
    assert parse_completion(reply, 2).token_ids == [6, 7]


def test_openai_retries_429_500_drop_then_succeeds(server):
    server.scripts = {1: ["429", "500", "drop", "503"], 2: ["ok"]}
    gen = make_generator("openai", "m", base_url=server.url, **FAST)
    outs = gen.generate([[1, 2], [2, 3]], SamplingConfig(max_new_tokens=3, topk_logprobs=2))
    assert outs[0].error is None and outs[0].meta["attempts"] == 5 and outs[0].token_ids == [3, 4, 5]
    assert outs[1].meta["attempts"] == 1
    assert gen.last_stats["retries"] == 4 and gen.last_stats["failed"] == 0


def test_openai_timeout_is_retried(server):
    server.scripts = {1: ["sleep:1.5"]}
    gen = make_generator("openai", "m", base_url=server.url, **{**FAST, "timeout": 0.5})
    t0 = time.perf_counter()
    [g] = gen.generate([[1, 2]], SamplingConfig(max_new_tokens=2))
    assert g.error is None and g.meta["attempts"] == 2 and time.perf_counter() - t0 < 5
    assert g.topk_ids is None


def test_openai_per_item_failures_do_not_raise(server):
    # item 1: a 400 (not retried); item 2: 500 forever (retries exhausted); item 3: fine
    server.scripts = {1: ["400"], 2: ["500"] * 10}
    gen = make_generator("openai", "m", base_url=server.url, max_retries=3, **FAST)
    outs = gen.generate([[1], [2], [3]], SamplingConfig(max_new_tokens=2))
    assert "HTTP 400" in outs[0].error and outs[0].meta["attempts"] == 1
    assert "HTTP 500" in outs[1].error and "retries exhausted" in outs[1].error and outs[1].meta["attempts"] == 4
    assert outs[2].error is None and outs[2].token_ids == [4, 5]
    assert outs[0].token_ids == [] and not outs[0].finished and not outs[0].ok


def test_openai_too_few_logprobs_is_an_item_error(server):
    server.scripts = {1: ["short"]}
    gen = make_generator("openai", "m", base_url=server.url, **FAST)
    outs = gen.generate([[1], [2]], SamplingConfig(max_new_tokens=2, topk_logprobs=4))
    assert "asked for 4" in outs[0].error and outs[0].meta["attempts"] == 1
    assert outs[1].ok and outs[1].topk_ids.shape == (2, 4)


def test_openai_string_tokens_fall_back_to_tokenizer(server):
    class Tok:  # convert_tokens_to_ids for vocab strings "tokN"
        unk_token_id = 0
        unk_token = "<unk>"

        def convert_tokens_to_ids(self, t):
            return int(t[3:]) if t.startswith("tok") else 0

    server.scripts = {1: ["strings"]}
    gen = make_generator("openai", "m", base_url=server.url, tokenizer=Tok(), **FAST)
    [g] = gen.generate([[1]], SamplingConfig(max_new_tokens=3, topk_logprobs=2))
    assert g.token_ids == [2, 3, 4] and g.topk_ids[:, 0].tolist() == [2, 3, 4]
    # without a tokenizer the same reply is an item error, not a crash
    server.scripts = {1: ["strings"]}
    [g] = make_generator("openai", "m", base_url=server.url, **FAST).generate([[1]], SamplingConfig(max_new_tokens=3, topk_logprobs=2))
    assert "no tokenizer" in g.error


def test_openai_dead_server_fails_fast():
    gen = make_generator("openai", "m", base_url=_free_port_url(), max_concurrency=4, retry_budget=6,
                         breaker_threshold=4, backoff_base=0.02, backoff_max=0.1, timeout=2.0)
    t0 = time.perf_counter()
    outs = gen.generate([[i + 1] for i in range(40)], SamplingConfig(max_new_tokens=2))
    elapsed = time.perf_counter() - t0
    assert all(o.error and ("connection error" in o.error or "not sent" in o.error) for o in outs)
    assert gen.last_stats["retries"] <= 6 and gen.last_stats["circuit_open"]
    assert sum(o.meta["attempts"] for o in outs) < 40 + 6  # budget bounds the retries; some never sent
    assert any("not sent" in o.error for o in outs)
    assert elapsed < 10


def test_openai_round_robin_and_failover(server):
    other = FaultServer()
    try:
        gen = make_generator("openai", "m", base_url=[server.url, other.url], **FAST)
        outs = gen.generate([[i + 1] for i in range(8)], SamplingConfig(max_new_tokens=1))
        assert all(o.ok for o in outs) and len(server.requests) == 4 and len(other.requests) == 4
    finally:
        other.close()
    # one dead URL among two: every item still succeeds (a retry goes to the next URL)
    gen = make_generator("openai", "m", base_url=[_free_port_url(), server.url], **FAST)
    outs = gen.generate([[i + 1] for i in range(6)], SamplingConfig(max_new_tokens=1))
    assert all(o.ok for o in outs)


def test_openai_health_check_leaves_out_dead_and_wrong_model_urls(server):
    """Three URLs: nothing listening, a server of another model, a good one. The probe keeps only the good
    one: every POST goes there, none to the wrong model."""
    dead = _free_port_url()
    wrong = FaultServer(models=("other",))
    try:
        gen = make_generator("openai", "m", base_url=[dead, wrong.url, server.url], api_key="k", **FAST)
        outs = gen.generate([[i + 1] for i in range(6)], SamplingConfig(max_new_tokens=1))
        assert all(o.ok for o in outs) and all(o.meta["attempts"] == 1 for o in outs)
        assert len(wrong.requests) == 0 and len(server.requests) == 6
        st = gen.last_stats
        assert st["urls"] == 3 and st["healthy_urls"] == [server.url]
        assert set(st["dropped_urls"]) == {dead, wrong.url}
        assert "connection error" in st["dropped_urls"][dead]
        assert "'m' not served" in st["dropped_urls"][wrong.url]
        assert {"path": "/v1/models", "auth": "Bearer k"} in server.gets and wrong.gets
        # health_check=False: no probe, the wrong-model server is in the rotation again
        gen = make_generator("openai", "m", base_url=[wrong.url, server.url], health_check=False, **FAST)
        outs = gen.generate([[i + 1] for i in range(4)], SamplingConfig(max_new_tokens=1))
        assert all(o.ok for o in outs) and len(wrong.requests) == 2 and gen.last_stats["dropped_urls"] == {}
    finally:
        wrong.close()


def test_openai_failing_url_is_dropped_during_the_call(server):
    """Both servers pass the probe, one answers every completion with 500: after `unhealthy_after` failures
    in a row it leaves the rotation and its items' retries go to the other. With max_concurrency=1 it gets
    exactly `unhealthy_after` POSTs (with c requests in flight the bound is unhealthy_after + c - 1)."""
    bad = FaultServer(default="500")
    try:
        gen = make_generator("openai", "m", base_url=[bad.url, server.url], max_concurrency=1,
                             unhealthy_after=3, **FAST)
        outs = gen.generate([[i + 1] for i in range(10)], SamplingConfig(max_new_tokens=1))
        assert all(o.ok for o in outs)
        assert len(bad.requests) == 3 and len(server.requests) == 10
        st = gen.last_stats
        assert st["healthy_urls"] == [server.url] and "3 failures in a row" in st["dropped_urls"][bad.url]
        assert "HTTP 500" in st["dropped_urls"][bad.url] and st["retries"] == 3
    finally:
        bad.close()
    # a 429 means busy, not down: the URL stays in the rotation
    busy = FaultServer(default="429")
    try:
        gen = make_generator("openai", "m", base_url=[busy.url, server.url], max_concurrency=1,
                             unhealthy_after=2, max_retries=10, retry_budget=50, **FAST)
        outs = gen.generate([[i + 1] for i in range(6)], SamplingConfig(max_new_tokens=1))
        assert all(o.ok for o in outs) and gen.last_stats["dropped_urls"] == {}
        assert len(busy.requests) > 2  # dropped, it would have had exactly 2
    finally:
        busy.close()


def test_openai_no_healthy_url_keeps_all_and_fails_per_item(caplog):
    """Nothing passes the probe (no listener; /models 503 and every completion 500): all URLs are kept,
    a warning is logged, the items fail with recorded errors and nothing raises."""
    sick = FaultServer(default="500", models_down=True)
    dead = _free_port_url()
    try:
        gen = make_generator("openai", "m", base_url=[dead, sick.url], max_retries=2, **FAST)
        with caplog.at_level("WARNING", logger="model.generation.fleet"):
            outs = gen.generate([[i + 1] for i in range(4)], SamplingConfig(max_new_tokens=1))
        assert all(not o.ok and o.error and o.meta["errors"] for o in outs)
        assert any("no healthy base URL" in r.getMessage() for r in caplog.records)
        assert len(sick.requests) > 0  # kept in the rotation despite the failed probe
        st = gen.last_stats
        assert st["failed"] == 4 and len(st["healthy_urls"]) == 1  # passive removal never drops the last one
        assert all("health check" not in why for why in st["dropped_urls"].values())
    finally:
        sick.close()


def test_openai_concurrency_cap():
    srv = FaultServer(latency=0.1)
    try:
        gen = make_generator("openai", "m", base_url=srv.url, max_concurrency=3, **FAST)
        outs = gen.generate([[i + 1] for i in range(12)], SamplingConfig(max_new_tokens=1))
        assert all(o.ok for o in outs) and srv.max_inflight <= 3 and srv.max_inflight >= 2
    finally:
        srv.close()


def test_openai_generate_inside_running_loop(server):
    gen = make_generator("openai", "m", base_url=server.url, **FAST)

    async def main():
        sync = gen.generate([[1]], SamplingConfig(max_new_tokens=2))  # from inside a loop: runs in a thread
        asyn = await gen.agenerate([[1]], SamplingConfig(max_new_tokens=2))
        return sync, asyn

    sync, asyn = asyncio.run(main())
    assert sync[0].token_ids == asyn[0].token_ids == [2, 3]


def test_backoff_grows_with_jitter_and_honours_retry_after():
    import random

    rng = random.Random(0)
    d = [backoff_delay(a, 0.5, 8.0, rng=rng) for a in (1, 2, 3, 4, 5, 6, 7)]
    assert 0.25 <= d[0] <= 0.5 and 0.5 <= d[1] <= 1.0 and 1.0 <= d[2] <= 2.0
    assert all(4.0 <= x <= 8.0 for x in d[4:])  # capped
    assert backoff_delay(1, 0.5, 8.0, retry_after=3.0, rng=rng) == 3.0
    assert backoff_delay(1, 0.5, 8.0, retry_after=60.0, rng=rng) == 8.0


def test_generation_dataclass_failed():
    g = Generation.failed("boom", attempts=2)
    assert not g.ok and g.error == "boom" and g.meta["attempts"] == 2 and g.token_ids == []

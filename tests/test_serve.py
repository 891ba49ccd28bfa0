"""`d2l serve` with the transformers+peft backend, through real HTTP (uvicorn on a free port, the `openai`
client): documents in, adapters out, answers checked token by token against an in-process PeftModel.

The hypernetwork is a freshly initialised one for SmolLM2 with its B switched on (tests/support/hypernets.py),
so every adapter is non-zero and different per document; equality checks are therefore not vacuous."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from flows.serve import ServerThread, build_app
from benchmarks.demo_hypernet import demo_hypernet_run
from tasks.serve import DocumentService, ServeConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = ("The ferry of Quillmarsh leaves the north pier at seven bells. Its captain, Marguerite Okonkwo, "
       "keeps a tame heron named Pilot on the wheelhouse roof. The fare is two brass tokens.")
QUESTION = "Who is the captain of the Quillmarsh ferry?"
TOL = 1e-4  # log-prob agreement between the server's answer and an in-process PeftModel forward (fp32)


def topics(n: int) -> list[str]:
    things = ["lantern", "orchard", "bridge", "library", "mill", "harbour", "observatory", "bakery", "quarry"]
    return [f"The {things[i]} of Vell{i} was built by a mason called Idris{i} in the year {1700 + 13 * i}. "
            f"It is painted {['red', 'blue', 'green', 'grey'][i % 4]} and {i + 2} cats live there." for i in range(n)]


@pytest.fixture(scope="module")
def run_dir(smollm2_dir, tmp_path_factory):
    return demo_hypernet_run(smollm2_dir, tmp_path_factory.mktemp("hypernet") / "demo")


def make_config(store, run_dir, **more) -> ServeConfig:
    more = {"max_loras": 2, **more}
    return ServeConfig(store=str(store), checkpoint=str(run_dir), chunk_max_tokens=64, max_lora_rank=64,
                       max_document_bytes=100_000, max_new_tokens=32, **more)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("serve-store")
    service = DocumentService(make_config(store, run_dir))
    with ServerThread(build_app(service)) as srv:
        srv.service, srv.store = service, store
        yield srv


def post_doc(url: str, text: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}/documents", json={"text": text, **kw}, timeout=300)


class Reference:
    """The in-process reference: a fresh base model with the stored adapters loaded into one PeftModel."""

    def __init__(self, model_dir, store):
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.store, self.peft = store, None

    def logprobs(self, adapter_id: str | None, prompt: list[int], answer: list[int]) -> torch.Tensor:
        """log-softmax at each answer position [len(answer), vocab], with `adapter_id` (None: the base)."""
        from peft import PeftModel

        if adapter_id is not None:
            path = str(self.store / "adapters" / adapter_id)
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=adapter_id).eval()
            elif adapter_id not in self.peft.peft_config:
                self.peft.load_adapter(path, adapter_name=adapter_id)
            self.peft.set_adapter(adapter_id)
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            if adapter_id is None and self.peft is not None:
                with self.peft.disable_adapter():
                    logits = self.peft(ids).logits
            else:
                logits = (self.peft if adapter_id is not None else self.base)(ids).logits
        return torch.log_softmax(logits[0, len(prompt) - 1: len(prompt) - 1 + len(answer)].float(), -1)


def token_ids(logprobs) -> list[int]:
    return [int(t.token.split(":", 1)[1]) for t in logprobs.content]


def max_diff(ref: torch.Tensor, logprobs) -> float:
    """Largest |server - reference| over every reported (chosen and top) log-prob."""
    worst = 0.0
    for t, row in zip(logprobs.content, ref):
        pairs = [(t.token, t.logprob)] + [(x.token, x.logprob) for x in t.top_logprobs]
        for tok, lp in pairs:
            worst = max(worst, abs(float(row[int(tok.split(":", 1)[1])]) - lp))
    return worst


def chat(client, model: str, question: str, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=kw.pop("max_tokens", 12),
        temperature=0, logprobs=True, top_logprobs=5, extra_body={"return_tokens_as_token_ids": True}, **kw)


def test_document_in_answers_out_adapter_applied(server, smollm2_dir, request):
    from openai import OpenAI

    resp = post_doc(server.url, DOC, name="quillmarsh")
    assert resp.status_code == 201, resp.text
    doc = resp.json()
    aid = doc["adapter_id"]
    assert len(aid) == 24 and doc["chunks"] >= 1 and doc["reused"] is False
    folder = server.store / "adapters" / aid
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file
    b = [v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and all(float(t.abs().max()) > 0 for t in b)  # a non-zero adapter: the checks below mean something

    client = OpenAI(base_url=server.url, api_key="unused")
    base_name = server.service.model_name
    assert {m.id for m in client.models.list().data} == {base_name}  # nothing loaded yet
    with_doc = chat(client, aid, QUESTION)
    without = chat(client, base_name, QUESTION)
    assert with_doc.choices[0].message.content.strip()
    assert aid in {m.id for m in client.models.list().data}

    tok = server.service.backend.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "input_ids") else prompt)
    ref = Reference(smollm2_dir, server.store)
    a_ids, b_ids = token_ids(with_doc.choices[0].logprobs), token_ids(without.choices[0].logprobs)
    d_adapter = max_diff(ref.logprobs(aid, prompt, a_ids), with_doc.choices[0].logprobs)
    d_base = max_diff(ref.logprobs(None, prompt, b_ids), without.choices[0].logprobs)
    assert d_adapter < TOL and d_base < TOL, (d_adapter, d_base)
    # the adapter is really applied: the base model's log-probs of the adapter's own answer differ
    cross = max_diff(ref.logprobs(None, prompt, a_ids), with_doc.choices[0].logprobs)
    assert cross > 1e-2, cross

    # streaming gives the same text; completions with token ids give the same tokens
    stream = client.chat.completions.create(model=aid, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == with_doc.choices[0].message.content
    comp = client.completions.create(model=aid, prompt=prompt, max_tokens=12, temperature=0, logprobs=3,
                                     extra_body={"return_tokens_as_token_ids": True})
    assert [int(t.split(":")[1]) for t in comp.choices[0].logprobs.tokens] == a_ids
    request.node.user_properties.append(("diffs", (d_adapter, d_base, cross)))
    print(f"server vs PeftModel: max |dlogprob| {d_adapter:.1e} (adapter), {d_base:.1e} (base); "
          f"adapter vs base on the same answer: {cross:.2f}")


def test_repost_does_no_work_and_restart_lazy_loads(server, run_dir):
    first = post_doc(server.url, DOC + " Extra line for this test.")
    assert first.status_code == 201
    before = server.service.intern.documents_internalized
    again = post_doc(server.url, DOC + " Extra line for this test.")
    assert again.status_code == 200 and again.json()["reused"] is True
    assert again.json()["adapter_id"] == first.json()["adapter_id"]
    assert server.service.intern.documents_internalized == before  # no hypernetwork work the second time
    print(f"repost: {again.json()['seconds'] * 1000:.0f} ms vs {first.json()['seconds'] * 1000:.0f} ms first "
          f"(ratio {again.json()['seconds'] / first.json()['seconds']:.3f}), hypernetwork documents unchanged")

    from storage.catalog import Catalog
    from storage.sql import run_query

    cols, rows = run_query(Catalog(server.store), "SELECT id, doc_sha, checkpoint, rank, chunks, bytes, created, "
                                                  "last_used FROM adapters ORDER BY created")
    row = dict(zip(cols, next(r for r in rows if r[0] == first.json()["adapter_id"])))
    assert row["rank"] == first.json()["rank"] and row["bytes"] > 0 and row["checkpoint"].endswith("step-00000000")

    # a restarted server (a new service over the same store) lists nothing loaded, serves every stored adapter
    restarted = DocumentService(make_config(server.store, run_dir))
    stored = restarted.store.ids()
    assert first.json()["adapter_id"] in stored and restarted.cache.loaded() == []
    with ServerThread(build_app(restarted)) as srv:
        h = httpx.get(srv.url.removesuffix("/v1") + "/health").json()
        assert h["adapters_stored"] == len(stored) and h["adapters_loaded"] == 0
        r = httpx.post(f"{srv.url}/chat/completions", timeout=300, json={
            "model": first.json()["adapter_id"], "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        h = httpx.get(srv.url.removesuffix("/v1") + "/health").json()
        assert h["adapter_loads"] == 1 and h["adapters_loaded"] == 1 and h["documents_internalized"] == before


def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(server):
    url = server.url
    work = server.service.intern.documents_internalized

    def err(resp, status, *words):
        assert resp.status_code == status, (resp.status_code, resp.text)
        msg = resp.json()["error"]["message"]
        assert all(w in msg for w in words), msg
        return resp.json()["error"]

    err(post_doc(url, ""), 422, "empty")
    err(post_doc(url, "   \n "), 422, "empty")
    big = b"a" * (50 * 1024 * 1024)
    err(httpx.post(f"{url}/documents", content=big, headers={"Content-Type": "text/plain"}, timeout=120), 413,
        "limit", "100000")
    err(httpx.post(f"{url}/documents", content=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
                   headers={"Content-Type": "text/plain"}), 415, "binary")
    err(httpx.post(f"{url}/documents", content=b"\xff\xfe\x00a", headers={"Content-Type": "application/octet-stream"}),
        415, "content type")
    err(httpx.post(f"{url}/documents", files={"file": ("x.bin", b"\x00\x01\x02\xff")}), 415, "binary")
    err(httpx.post(f"{url}/documents", content=b'{"text": "unclosed', headers={"Content-Type": "application/json"}),
        400, "malformed JSON")
    assert err(post_doc(url, "hi", colour="red"), 422)["param"] == "colour"
    long_doc = " ".join(topics(9)) * 6  # far over 7 chunks of 64 tokens -> rank over 64
    assert err(post_doc(url, long_doc), 422, "max_lora_rank 64")["param"] == "text"
    assert server.service.intern.documents_internalized == work  # no hypernetwork work for any of them

    chat_url = f"{url}/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    assert err(httpx.post(chat_url, json={"model": "0" * 24, "messages": msg}), 404, "unknown model")["param"] == "model"
    assert err(httpx.post(chat_url, json={"model": server.service.model_name}), 422)["param"] == "messages"
    assert err(httpx.post(chat_url, json={"model": "x", "messages": msg, "max_tokens": "many"}), 422)["param"] == \
        "max_tokens"
    err(httpx.post(chat_url, content=b"{nope", headers={"Content-Type": "application/json"}), 400, "malformed JSON")
    err(httpx.delete(f"{url}/documents/{'0' * 24}"), 404, "no adapter")

    ok = httpx.post(chat_url, json={"model": server.service.model_name, "messages": msg, "max_tokens": 3}, timeout=300)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_a_full_queue_gets_429(server):
    """One request running, one waiting: of 10 sent at once most are refused with 429, the rest answered."""
    with ServerThread(build_app(server.service, max_in_flight=1, max_queue=1)) as srv:
        body = {"model": server.service.model_name, "messages": [{"role": "user", "content": "Count to ten."}],
                "max_tokens": 24, "temperature": 0}
        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{srv.url}/chat/completions", json=body, timeout=300), range(10)))
        statuses = sorted(r.status_code for r in codes)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
        refused = next(r for r in codes if r.status_code == 429).json()["error"]
        assert refused["type"] == "rate_limit_error" and "busy" in refused["message"]
        assert httpx.post(f"{srv.url}/chat/completions", json=body, timeout=300).status_code == 200


def concurrent_documents_then_chats(url: str, service, store, model_dir, n_docs: int, n_chats: int,
                                    max_tokens: int) -> dict:
    """Post `n_docs` new documents at once, then `n_chats` chats spread over them (8 at a time); check every
    answer's log-probs against an in-process PeftModel with its own adapter, and that a neighbour's adapter does
    not explain it. Returns the numbers."""
    texts = [t + f" ({n_docs}/{n_chats})" for t in topics(n_docs)]
    work = service.intern.documents_internalized
    with ThreadPoolExecutor(8) as pool:
        posted = list(pool.map(lambda t: post_doc(url, t), texts))
    assert all(r.status_code == 201 for r in posted), [r.text for r in posted]
    ids = [r.json()["adapter_id"] for r in posted]
    assert len(set(ids)) == n_docs and service.intern.documents_internalized == work + n_docs
    evictions = service.cache.evictions

    def ask(i: int) -> dict:
        body = {"model": ids[i % n_docs], "messages": [{"role": "user", "content": f"Who built it? ({i})"}],
                "max_tokens": max_tokens, "temperature": 0, "logprobs": True, "top_logprobs": 3,
                "return_tokens_as_token_ids": True}
        return httpx.post(f"{url}/chat/completions", json=body, timeout=1200).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(n_chats)))
    assert all("choices" in a for a in answers), [a for a in answers if "choices" not in a][:2]
    assert len(service.cache.loaded()) <= service.cache.max_loras

    from openai.types.chat import ChatCompletion

    ref = Reference(model_dir, store)
    worst_own, closest_other = 0.0, float("inf")
    for i, a in enumerate(answers):
        lp = ChatCompletion.model_validate(a).choices[0].logprobs
        prompt = service.backend.chat_prompt([{"role": "user", "content": f"Who built it? ({i})"}])
        answer = token_ids(lp)
        worst_own = max(worst_own, max_diff(ref.logprobs(ids[i % n_docs], prompt, answer), lp))
        other = ids[(i + 1) % n_docs]  # a neighbour's adapter must not explain this answer
        closest_other = min(closest_other, max_diff(ref.logprobs(other, prompt, answer), lp))
    assert worst_own < TOL and closest_other > 1e-3, (worst_own, closest_other)
    h = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert h["latency_p95_s"] >= h["latency_p50_s"] > 0
    out = {"evictions": service.cache.evictions - evictions, "worst_own": worst_own, "closest_other": closest_other,
           "health": h}
    print(f"{n_chats} chats over {n_docs} adapters, {service.cache.max_loras} slots: evictions {out['evictions']}; "
          f"max |dlogprob| vs own adapter {worst_own:.1e}, min vs a neighbour's {closest_other:.2f}; "
          f"p50 {h['latency_p50_s']} s p95 {h['latency_p95_s']} s")
    return out


def test_3_concurrent_documents_then_6_chats_with_2_slots(server, smollm2_dir):
    """The fast variant (the module server holds 2 adapters)."""
    out = concurrent_documents_then_chats(server.url, server.service, server.store, smollm2_dir, 3, 6, 3)
    assert out["evictions"] >= 1


@pytest.mark.slow
def test_8_concurrent_documents_then_32_chats_with_4_slots(server, run_dir, smollm2_dir):
    """The issue's numbers: 8 documents at once, 32 chats, max_loras 4 (10 min on a loaded 2-core machine)."""
    service = DocumentService(make_config(server.store, run_dir, max_loras=4))
    with ServerThread(build_app(service)) as srv:
        out = concurrent_documents_then_chats(srv.url, service, server.store, smollm2_dir, 8, 32, 6)
    assert out["evictions"] >= 4 and out["health"]["evictions"] >= 4


def test_internalize_flow_batched_idempotent(server, run_dir, prefect_server, tmp_path):
    """The Prefect flow: files in batches of 2 -> adapters in the store; a rerun does no work."""
    from flows.internalize import internalize_flow
    from tasks.internalize import InternalizeFlowConfig

    paths = []
    for i, text in enumerate(topics(3)):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text + " (flow)")
    paths.append(tmp_path / "empty.txt")
    paths[-1].write_text(" ")
    cfg = InternalizeFlowConfig(store=str(server.store), checkpoint=str(run_dir), chunk_max_tokens=64,
                                max_lora_rank=64, batch_size=2, paths=[str(p) for p in paths])
    first = internalize_flow(cfg)
    assert (first["documents"], first["created"], first["reused"], first["rejected"], first["batches"]) == (4, 3, 0, 1, 2)
    again = internalize_flow(cfg)
    assert (again["created"], again["reused"], again["rejected"]) == (0, 3, 1)
    print(f"internalize flow: {first['adapters_per_second']} adapters/s in batches of 2; rerun {again['seconds']} s")


def test_vllm_rules_refuse_at_export_time():
    """What vLLM's loader would refuse is refused when the adapter is written, with every reason named."""
    from model.serving.rules import VLLMRuleError, check_vllm, server_max_lora_rank, vllm_problems

    good = {"r": 16, "rank_pattern": {"model.layers.0.mlp.down_proj": 24}, "bias": "none", "modules_to_save": None,
            "target_modules": ["down_proj", "q_proj"]}
    assert vllm_problems(good, "LlamaForCausalLM", 32) == []
    assert server_max_lora_rank(24) == 32 and server_max_lora_rank(8) == 8
    bad = dict(good, bias="all", modules_to_save=["lm_head"], target_modules=["down_proj", "conv"])
    with pytest.raises(VLLMRuleError) as e:
        check_vllm(bad, "LlamaForCausalLM", 16)
    msg = str(e.value)
    assert all(w in msg for w in ("rank 24 is over the server's max_lora_rank 16", "bias", "modules_to_save",
                                  "['conv']"))
    assert "not known" in vllm_problems(good, "GPT2LMHeadModel")[0]


def test_delete_document_unloads_and_forgets_it(server):
    aid = post_doc(server.url, "A short note about the violet kite of Arnsby, to be deleted.").json()["adapter_id"]
    msg = [{"role": "user", "content": "Kite?"}]
    assert httpx.post(f"{server.url}/chat/completions", json={"model": aid, "messages": msg, "max_tokens": 2},
                      timeout=300).status_code == 200
    assert aid in {m["id"] for m in httpx.get(f"{server.url}/models").json()["data"]}
    r = httpx.delete(f"{server.url}/documents/{aid}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert aid not in {m["id"] for m in httpx.get(f"{server.url}/models").json()["data"]}
    assert aid not in server.service.store.ids() and aid not in server.service.cache.loaded()
    gone = httpx.post(f"{server.url}/chat/completions", json={"model": aid, "messages": msg, "max_tokens": 2})
    assert gone.status_code == 404

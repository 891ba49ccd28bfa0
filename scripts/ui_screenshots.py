"""Screenshots of the Prefect UI as an operator sees it: a pipeline run's live progress, a finished run's
summary, the train deployment's form. Headless Chromium (the system browser) driven by Selenium.

    apt-get install -y chromium chromium-driver && .venv/bin/pip install selenium
    .venv/bin/python scripts/ui_screenshots.py --out /tmp/shots

It starts its own Prefect server (UI on), a process work pool, `prefect deploy --all` and a worker, all in a
scratch folder and stopped at the end; runs the pipeline deployment on the built-in toy model (ten toy
sources, so the run lasts long enough to be caught mid-way), and saves PNGs (plus the page HTML) to --out.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = "doc2lora-pool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Prefect server at {url}")


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    driver_path = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def shoot(driver, url: str, path: Path, settle: float = 6.0, must_see: str | None = None) -> None:
    """Open `url`, wait for the app to render (and `must_see` to appear), save a PNG and the page's HTML."""
    driver.get(url)
    deadline = time.monotonic() + 60
    time.sleep(settle)
    while must_see and must_see not in driver.page_source and time.monotonic() < deadline:
        time.sleep(1)
    driver.save_screenshot(str(path))
    path.with_suffix(".html").write_text(driver.page_source)
    print(f"saved {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for the PNG (and HTML) files.")
    ap.add_argument("--sources", type=int, default=10, help="Toy sources of the run (more: a longer run).")
    ap.add_argument("--toy-model", type=Path, default=None,
                    help="A built toy model folder to reuse (default: build one, minutes on a busy CPU).")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="d2l-shots-"))
    port = free_port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(scratch / "home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PREFECT_WORKER_QUERY_SECONDS="1")
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], cwd: Path) -> None:
        log = open(scratch / f"{name}.log", "wb")
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def prefect(*a: str) -> None:
        subprocess.run([sys.executable, "-m", "prefect", *a], env=env, cwd=REPO, check=True, capture_output=True)

    try:
        start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                         str(port)], scratch)
        wait_healthy(api)
        prefect("work-pool", "create", POOL, "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], scratch)
        sys.path.insert(0, str(REPO))
        from model.base_models import resolve_base_model

        toy = args.toy_model.resolve() if args.toy_model else resolve_base_model("toy", scratch / "models")
        os.environ.update(PREFECT_API_URL=api)
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        config = {"store": str(scratch / "store"), "base_model": str(toy), "stages": ["synthesize", "teacher"],
                  "sources": [f"synthetic://facts?n=3&seed={s}" for s in range(args.sources)],
                  "synthesize": {"llm_for_gold_docs": True, "questions_per_round": 2, "max_new_tokens": 12},
                  "teacher": {"topk": 8, "max_new_tokens": 1}, "runner": {"workers": 1}}  # 1 token: data loss
        run = run_deployment("pipeline/pipeline", parameters={"config": config}, timeout=0)
        driver = browser(1400, 1100)
        with get_client(sync_client=True) as client:
            progress_seen = None
            while True:
                state = client.read_flow_run(run.id).state
                arts = [a for a in client.read_artifacts() if a.key == "d2l-pipeline-progress"
                        and a.flow_run_id == run.id]
                if arts and 0 < float(arts[0].data or 0) < 100 and progress_seen is None:
                    progress_seen = arts[0]
                    shoot(driver, f"{ui}/artifacts/artifact/{arts[0].id}", args.out / "1-progress-mid-run.png",
                          settle=4, must_see="units done")
                    shoot(driver, f"{ui}/runs/flow-run/{run.id}", args.out / "1b-parent-run-mid-run.png", settle=4)
                if state is not None and state.is_final():
                    break
                time.sleep(1)
            print(f"run ended: {state.type.value} ({state.name}): {state.message}")
            driver.set_window_size(1400, 2200)
            shoot(driver, f"{ui}/runs/flow-run/{run.id}", args.out / "2-finished-run.png", settle=10,
                  must_see="stage index: done")
            driver.set_window_size(1400, 1100)
            summary = next(a for a in client.read_artifacts() if a.key == "d2l-pipeline" and a.flow_run_id == run.id)
            shoot(driver, f"{ui}/artifacts/artifact/{summary.id}", args.out / "3-finished-summary.png",
                  must_see="kept teacher")
            final = next(a for a in client.read_artifacts() if a.key == "d2l-pipeline-progress"
                         and a.flow_run_id == run.id)
            shoot(driver, f"{ui}/artifacts/artifact/{final.id}", args.out / "4-progress-finished.png")
            train = next(d for d in client.read_deployments() if d.name == "train")
            driver.set_window_size(1400, 2600)
            shoot(driver, f"{ui}/deployments/deployment/{train.id}/run", args.out / "5-train-form.png",
                  settle=8, must_see="hyper")
        driver.quit()
        return 0
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        print(f"logs in {scratch}")


if __name__ == "__main__":
    sys.exit(main())

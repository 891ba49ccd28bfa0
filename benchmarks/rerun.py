"""How long a rerun of a finished pipeline takes, next to the first run, and where its time goes.

    python benchmarks/rerun.py                  # toy model, 10 sources; ephemeral and persistent server
    python benchmarks/rerun.py --no-persistent  # only Prefect's temporary (ephemeral) server

For each server mode, on a fresh store: the first run, a rerun by the `d2l run` command itself (the store's
stamp answers before typer, Prefect, DuckDB or torch is imported: flows/entry.py, flows/uptodate.py), and
a rerun with D2L_ALWAYS_RUN_FLOWS=1 (every flow runs and finds every unit done). Each run is its own
process, timed from spawn to exit; the first and the forced one are split into phases: interpreter +
up-to-date check, imports + config, Prefect server start + flow run setup (time from the pipeline call to
the pipeline's start in the catalog), each stage (its start/finish in the catalog's `runs` table), Prefect
between stages, and teardown (return to process exit: the temporary server stops then). "Model work" is
the first run's synthesize + teacher time. Ratios only: state the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGES = ("ingest", "chunk", "synthesize", "teacher", "index")
CONFIG = """store: {store}
base_model: {model}
sources: [{corpus}]
progress: false
stages: [synthesize, teacher]
chunk: {{max_tokens: 96}}
synthesize: {{questions_per_round: 2, max_new_tokens: 24}}
teacher: {{topk: 8, max_new_tokens: 24}}
"""


def child(config: str) -> None:
    """One `d2l run --config CONFIG`, step by step as flows/cli.py does it, printing timestamps as JSON."""
    t = {"start": time.time()}
    from flows.uptodate import CliRun

    run = CliRun(Path(config), [], None, [], None)
    if run.shortcut():  # children time the first and the forced runs: neither may find the store up to date
        raise SystemExit("the store was already up to date: this run was meant to run the flows")
    t["checked"] = time.time()
    from flows.config import load_config
    from flows.pipeline import pipeline_flow

    cfg = load_config(config)
    t["imported"] = time.time()
    stats = pipeline_flow(cfg)
    t["returned"] = time.time()
    run.remember(cfg, stats)
    t["end"] = time.time()
    print("D2L-BENCH " + json.dumps(t))


def build_inputs(work: Path, docs: int) -> tuple[Path, Path]:
    """The toy base model (built once, or reused from $D2L_MODEL_CACHE) and a corpus of `docs` files."""
    from model.base_models import resolve_base_model
    from model.toy.world import generate

    cache = Path(os.environ.get("D2L_MODEL_CACHE") or work / "models")
    model = resolve_base_model("toy", cache)
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(generate(docs, seed=11)):
        (corpus / f"doc{i:02d}.txt").write_text(d.text)
    return model, corpus


def run_once(config: Path, env: dict[str, str]) -> dict:
    """Spawn one run; its timestamps plus the spawn and exit times."""
    spawn = time.time()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("D2L-BENCH "))
    return {"spawn": spawn, "exit": end, **json.loads(line[len("D2L-BENCH "):])}


def run_command(config: Path, env: dict[str, str]) -> dict:
    """`d2l run --config CONFIG` as users type it (the console entry's module), timed from spawn to exit."""
    spawn = time.time()
    proc = subprocess.run([sys.executable, "-m", "flows.entry", "run", "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0 or "Up to date" not in proc.stdout:
        raise RuntimeError(f"the rerun was not answered as up to date ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return {"total": end - spawn, "d2l run (whole command)": end - spawn}


def stage_times(store: Path, since: float) -> dict[str, tuple[float, float]]:
    """(start, finish) as epoch seconds of each flow recorded in the catalog after `since`."""
    from storage.catalog import Catalog
    from storage.sql import run_query

    rows = run_query(Catalog(store), "SELECT flow, started, finished FROM runs ORDER BY started")[1]
    out = {}
    for flow, started, finished in rows:
        s = started.replace(tzinfo=timezone.utc).timestamp()
        if s >= since - 1 and finished is not None:
            out[flow] = (s, finished.replace(tzinfo=timezone.utc).timestamp())
    return out


def phases(t: dict, stages: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The split of one run's wall time (seconds)."""
    out = {"total": t["exit"] - t["spawn"]}
    out["interpreter + up-to-date check"] = t["checked"] - t["spawn"]
    out["imports + config"] = t["imported"] - t["checked"]
    p0, p1 = stages["pipeline"]
    out["server start + flow run setup"] = p0 - t["imported"]
    inside = 0.0
    for s in STAGES:
        if s in stages:
            out[f"stage {s}"] = stages[s][1] - stages[s][0]
            inside += out[f"stage {s}"]
    out["Prefect around and between stages"] = (p1 - p0) - inside
    out["pipeline end -> return"] = t["returned"] - p1
    out["record + teardown (server stop)"] = t["exit"] - t["returned"]
    return out


@contextmanager
def persistent_server(home: Path, port: int, env: dict[str, str]):
    """`prefect server start` in the background; yields its API URL; stopped at the end."""
    env = {**env, "PREFECT_HOME": str(home)}
    log = open(home.parent / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not start; see {log.name}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def scenario(name: str, work: Path, model: Path, corpus: Path, env: dict[str, str], runs: int = 3) -> dict:
    """First run, `d2l run` rerun, forced rerun (the first `runs` of them) on a fresh store; their phases."""
    store = work / f"store-{name}"
    shutil.rmtree(store, ignore_errors=True)
    config = work / f"{name}.yaml"
    config.write_text(CONFIG.format(store=store, model=model, corpus=corpus))
    out = {}
    for label, extra in (("first run", {}), ("rerun (d2l run)", {}),
                         ("rerun, flows forced", {"D2L_ALWAYS_RUN_FLOWS": "1"}))[:runs]:
        if label == "rerun (d2l run)":
            out[label] = run_command(config, env)
            continue
        t = run_once(config, {**env, **extra})
        out[label] = phases(t, stage_times(store, t["spawn"]))
    if runs < 3:
        return out
    first = out["first run"]
    out["model work"] = first.get("stage synthesize", 0.0) + first.get("stage teacher", 0.0)
    return out


def report(name: str, res: dict) -> None:
    first, work = res["first run"]["total"], res["model work"]
    print(f"\n== {name}: first run {first:.1f} s, of which model work (synthesize + teacher) {work:.1f} s")
    for label in ("rerun (d2l run)", "rerun, flows forced"):
        total = res[label]["total"]
        print(f"{label:22s} {total:6.2f} s = {total / first:.3f}x first run = {total / work:.3f}x model work")
    labels = list(dict.fromkeys(k for r in ("first run", "rerun (d2l run)", "rerun, flows forced")
                                for k in res[r]))
    print(f"{'phase (seconds)':40s} {'first':>8s} {'rerun':>8s} {'forced':>8s}")
    for k in labels:
        vals = [res[r].get(k) for r in ("first run", "rerun (d2l run)", "rerun, flows forced")]
        print(f"{k:40s} " + " ".join(f"{v:8.2f}" if v is not None else f"{'-':>8s}" for v in vals))


def cli_walls(env: dict[str, str], store: Path) -> None:
    """Wall time of `d2l --help` and `d2l sql "SELECT 1"` (a process each)."""
    for args in (["--help"], ["sql", "SELECT 1", "--store", str(store)]):
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                       check=True)
        print(f"d2l {' '.join(args[:2])!s:32s} {time.time() - t0:.2f} s wall")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--docs", type=int, default=10, help="Source files (one unit each).")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads of each run.")
    ap.add_argument("--no-persistent", action="store_true", help="Skip the persistent-server scenario.")
    ap.add_argument("--no-ephemeral", action="store_true", help="Skip the ephemeral-server scenario (and the "
                    "warm-up run before it).")
    ap.add_argument("--port", type=int, default=4391, help="Port of the persistent server.")
    ap.add_argument("--work", help="Working folder (default: a temporary one, removed at the end).")
    ap.add_argument("--no-warm-up", action="store_true", help="No warm-up run (when --work already holds a "
                    "migrated prefect-home and the caches are warm).")
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="d2l-rerun-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900",
           "PREFECT_HOME": str(work / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    env.pop("D2L_ALWAYS_RUN_FLOWS", None)
    print(f"load: {os.getloadavg()} at {datetime.now(timezone.utc):%H:%M:%S} UTC; work folder {work}")
    model, corpus = build_inputs(work, args.docs)
    if not args.no_ephemeral and not args.no_warm_up:
        warm = work / "warm"  # Prefect's database, the OS file cache, the model files, before anything is timed
        warm.mkdir(exist_ok=True)
        (warm / "one.txt").write_text((corpus / "doc00.txt").read_text())
        scenario("warm-up", work, model, warm, env, runs=1)
    if not args.no_ephemeral:
        report("ephemeral server (PREFECT_API_URL unset)", scenario("ephemeral", work, model, corpus, env))
    if not args.no_persistent:
        home = work / "server-home"
        home.mkdir(exist_ok=True)
        with persistent_server(home, args.port, env) as url:
            res = scenario("persistent", work, model, corpus, {**env, "PREFECT_API_URL": url})
        report(f"persistent server ({url})", res)
    cli_walls(env, work / ("store-persistent" if args.no_ephemeral else "store-ephemeral"))
    print(f"load after: {os.getloadavg()}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Checkpoints: exact round trip through safetensors + JSON, atomic overwrite, pickles refused."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.hypernet.lora import freeze
from model.training.checkpoint import UnsafeCheckpointError, load_checkpoint, load_hypernet, save_checkpoint
from model.hypernet.config import HyperConfig
from model.hypernet.network import HyperNetwork


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return freeze(LlamaForCausalLM(cfg)).eval()


def make(base):
    torch.manual_seed(1)
    cfg = HyperConfig(rank=2, latent_dim=8, latent_count=2, depth=1, heads=2)
    net = HyperNetwork.for_model(cfg, base)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return net, opt, sched


def train(net, opt, sched, steps):
    for _ in range(steps):
        feats = torch.randn(2, 2, 5, 16)
        ad = net(feats)
        loss = sum((l.A.sum() + l.B.sum()) ** 2 for l in ad.loras.values()) + sum(p.square().sum() for p in net.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_round_trip_is_exact_and_training_resumes_identically(tmp_path, base):
    net, opt, sched = make(base)
    train(net, opt, sched, 3)
    random.seed(5)
    np.random.seed(5)
    folder = save_checkpoint(tmp_path / "ckpt", net, net.config, opt, sched, step=3, extra={"epoch": 1})
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["state.json", "hyper_config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
         "scheduler.safetensors", "scheduler.json", "rng.safetensors", "rng.json"])
    expected_draws = (torch.rand(3), random.random(), np.random.rand())
    train(net, opt, sched, 2)  # the reference: training goes on without a restart
    ref = {k: v.clone() for k, v in net.state_dict().items()}

    net2, opt2, sched2 = make(base)
    info = load_checkpoint(folder, net2, opt2, sched2)
    assert info["step"] == 3 and info["extra"] == {"epoch": 1}
    assert HyperConfig.from_dict(info["config"]) == net.config
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expected_draws[0].tolist(), *expected_draws[1:])
    s1, s0 = opt2.state_dict(), opt.state_dict()
    assert s1["param_groups"][0]["betas"] == (0.9, 0.95) and set(s1["state"]) == set(s0["state"])
    assert sched2.last_epoch == 3
    train(net2, opt2, sched2, 2)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, ref[k]), k

    rebuilt = load_hypernet(folder)
    saved = load_checkpoint(folder, restore_rng=False)["state_dict"]
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved.items())


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path, base):
    net, opt, sched = make(base)
    save_checkpoint(tmp_path / "ckpt", net, step=1)
    with pytest.raises(TypeError):  # a value JSON cannot hold: the old checkpoint stays intact
        save_checkpoint(tmp_path / "ckpt", net, step=2, scheduler=type("S", (), {"state_dict": lambda s: {"f": object()}})())
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 1
    save_checkpoint(tmp_path / "ckpt", net, step=7)
    assert load_checkpoint(tmp_path / "ckpt", net)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_pickles_are_refused(tmp_path, base):
    net, _, _ = make(base)
    p = tmp_path / "weights.pt"
    p.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
        load_checkpoint(p, net)
    odd = tmp_path / "weights"  # no suffix, pickle bytes
    odd.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(odd)
    folder = tmp_path / "reference_ckpt"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(UnsafeCheckpointError):
        load_hypernet(folder)


def _saved(tmp_path, base) -> Path:
    net, _, _ = make(base)
    folder = tmp_path / "good"
    save_checkpoint(folder, net, config=net.config, step=1)
    return folder


@pytest.mark.parametrize("name", ["hyper_config.json", "state.json", "notes.json", "model.safetensors", "weights"])
def test_pickles_of_every_protocol_and_name_are_refused(tmp_path, base, name):
    folder = _saved(tmp_path, base)
    for protocol in (0, 1, 2, 5):
        (folder / name).write_bytes(pickle.dumps({"latent_dim": 8}, protocol=protocol))
        with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
            load_hypernet(folder)


def test_huge_sizes_in_hyper_config_are_refused_before_allocation(tmp_path, base):
    from model.training.checkpoint import CheckpointError

    folder = _saved(tmp_path, base)
    assert load_hypernet(folder) is not None
    cfg = json.loads((folder / "hyper_config.json").read_text())
    cfg.update(latent_dim=200_000, latent_count=100_000)  # ~160 GB of parameters if it were built
    (folder / "hyper_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match model.safetensors"):
        load_hypernet(folder)
    (folder / "hyper_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_hypernet(folder)


def test_a_safetensors_header_that_overruns_its_file_is_refused(tmp_path, base):
    from model.training.checkpoint import CheckpointError

    folder = _saved(tmp_path, base)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # the header promises more bytes than the file holds
    with pytest.raises(CheckpointError, match="does not fit the file"):
        load_hypernet(folder)


def test_cli_prints_one_line_for_a_bad_checkpoint(tmp_path, base):
    from typer.testing import CliRunner

    from flows.cli import app

    folder = _saved(tmp_path, base)
    cfg = json.loads((folder / "hyper_config.json").read_text())
    (folder / "hyper_config.json").write_text(json.dumps(dict(cfg, latent_dim=200_000, latent_count=100_000)))
    runner = CliRunner()
    for cmd in (["internalize", "some text", "--checkpoint", str(folder), "--out", str(tmp_path / "a")],
                ["internalize", "some text", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2 and res.exception is None or isinstance(res.exception, SystemExit), res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
    (folder / "hyper_config.json").write_text(json.dumps(cfg))
    (folder / "extra.json").write_bytes(pickle.dumps({"a": 1}, protocol=0))
    res = runner.invoke(app, ["internalize", "x", "--checkpoint", str(folder), "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "never unpickles" in res.output and not (tmp_path / "a").exists()

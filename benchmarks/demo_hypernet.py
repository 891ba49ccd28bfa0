"""A demo hypernetwork run folder for a real base model (SmolLM2), made in seconds: freshly initialised and
then moved off its zero-update start, so that the adapters it writes are not all zeros (B != 0)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def demo_hypernet_run(model_dir: Path, out: Path, *, rank: int = 8, target_modules=("down_proj",),
                      seed: int = 0, b_scale: float = 0.05) -> Path:
    """A run folder (checkpoints/step-00000000 + base_model.json) that `d2l serve --checkpoint` takes."""
    from transformers import AutoModelForCausalLM

    from model.hypernet.config import HyperConfig
    from model.hypernet.network import HyperNetwork
    from model.training.run_folder import save_step

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = HyperConfig(target_modules=list(target_modules), rank=rank, latent_dim=64, latent_count=8, depth=1,
                      heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = HyperNetwork.for_model(cfg, base)
        with torch.no_grad():
            for k in net.scale_B:  # the generated B: on; the bias LoRA's B: small random
                net.scale_B[k].fill_(1.0)
                net.bias_B[k].normal_(0.0, b_scale)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_model.json").write_text(json.dumps({"model_dir": str(model_dir)}))
    save_step(out, 0, 1, net, net.config, None, None, {})
    return out

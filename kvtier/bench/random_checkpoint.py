"""A random-weight checkpoint from a real model's config, for server runs whose weights cannot travel.

    kvtier bench random-checkpoint CONFIG_DIR OUT_DIR [--seed 0] [--device cpu]

CONFIG_DIR holds a Llama- or Qwen2-style `config.json` (and its tokenizer,
copied along). OUT_DIR gets the same files plus `model.safetensors` with
every weight drawn from a seeded normal. The full, unsharded weights are
written once, so servers launched with different tensor-parallel sizes load
the same model (sglang's `--load-format dummy` draws each rank's shard on its
own, so those models differ between `--tp 1` and `--tp 2`).

The scales make attention peaked rather than uniform (query and key weights
0.05, so scores spread over a few units): a KV budget then matters, as it
does in a trained model. The model is still chaotic: greedy answers of two
runs that differ only in summation order part after a few tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path
from typing import Dict

import torch

ARCHITECTURES = ("llama", "qwen2")
STD = {"embed": 0.5, "lm_head": 0.1, "q": 0.05, "k": 0.05, "v": 0.03, "o": 0.02, "mlp": 0.02}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_dir", help="a directory with the model's config.json (and tokenizer files)")
    p.add_argument("out_dir", help="where the checkpoint goes (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where weights are drawn; the values depend on it")


def random_weights(config: Dict, *, seed: int = 0, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """Every weight of a Llama/Qwen2 causal LM in bf16, by its Hugging Face name."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"random-checkpoint: expected model_type one of {ARCHITECTURES}, found {kind!r}")
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hq, hkv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = config.get("head_dim") or h // hq
    bias = kind == "qwen2" or bool(config.get("attention_bias", False))
    w: Dict[str, torch.Tensor] = {}

    def draw(name: str, shape, std: float) -> None:
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        w[name] = (torch.randn(*shape, generator=g, device=device) * std).to(torch.bfloat16).cpu()

    def ones(name: str) -> None:
        w[name] = torch.ones(h, dtype=torch.bfloat16)

    draw("model.embed_tokens.weight", (vocab, h), STD["embed"])
    if not config.get("tie_word_embeddings", False):
        draw("lm_head.weight", (vocab, h), STD["lm_head"])
    ones("model.norm.weight")
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        ones(p + "input_layernorm.weight")
        ones(p + "post_attention_layernorm.weight")
        for n, heads in (("q", hq), ("k", hkv), ("v", hkv)):
            draw(p + f"self_attn.{n}_proj.weight", (heads * d, h), STD[n])
            if bias:
                w[p + f"self_attn.{n}_proj.bias"] = torch.zeros(heads * d, dtype=torch.bfloat16)
        draw(p + "self_attn.o_proj.weight", (h, hq * d), STD["o"])
        draw(p + "mlp.gate_proj.weight", (inter, h), STD["mlp"])
        draw(p + "mlp.up_proj.weight", (inter, h), STD["mlp"])
        draw(p + "mlp.down_proj.weight", (h, inter), STD["mlp"])
    return w


def write(config_dir: Path, out_dir: Path, *, seed: int = 0, device: str = "cpu") -> Path:
    config_dir, out_dir = Path(config_dir), Path(out_dir)
    cfg_path = config_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"random-checkpoint: expected {cfg_path}")
    config = json.loads(cfg_path.read_text())
    weights = random_weights(config, seed=seed, device=device)
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ImportError("random-checkpoint: writing model.safetensors needs the safetensors package "
                          "(pip install -e '.[eval]' installs it)") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in config_dir.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy(f, out_dir / f.name)
    target = out_dir / "model.safetensors"
    save_file(weights, str(target), metadata={"format": "pt", "kvtier_random_seed": str(seed)})
    return target


def run(args: argparse.Namespace) -> int:
    try:
        target = write(Path(args.config_dir), Path(args.out_dir), seed=args.seed, device=args.device)
    except ImportError as exc:
        print(exc)
        return 2
    except (OSError, ValueError) as exc:
        print(f"random-checkpoint: {exc}")
        return 2
    except KeyError as exc:
        print(f"random-checkpoint: expected the key {exc} in {Path(args.config_dir) / 'config.json'}")
        return 2
    print(f"wrote {target} ({target.stat().st_size / 1e6:.0f} MB)")
    return 0

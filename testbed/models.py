"""Tiny random-weight models, generated offline and cached on disk.

No model hub is reachable from CI, so the test bed and the demo make their own
models: a byte-level BPE tokenizer trained on a generated corpus (with a ChatML
chat template), a dense Llama-style model and a Qwen3-MoE model (8 experts,
top-2), both saved with ``save_pretrained`` as bf16 safetensors. vLLM serves
them on CPU. Weights are random: outputs are gibberish, but every code path of
the serving engine (prefill, chunked prefill, decode, prefix cache, MoE routing)
runs for real.

Generation is deterministic (fixed seeds) and keyed by a hash of the recipe, so
a changed recipe lands in a new directory instead of reusing a stale one.

Usage: ``python -m testbed.models [--cache-dir DIR]`` prints the paths.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RECIPE_VERSION = 1
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

MODEL_RECIPES: dict[str, dict] = {
    "tiny-llama": {"arch": "llama", "config": {**_COMMON, "intermediate_size": 256}},
    "tiny-qwen3moe": {
        "arch": "qwen3_moe",
        "config": {
            **_COMMON,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
            "mlp_only_layers": [],
        },
    },
}

DENSE = "tiny-llama"
MOE = "tiny-qwen3moe"


@dataclass(frozen=True)
class TinyModels:
    """Paths of the generated model directories (each holds weights + tokenizer)."""

    dense: Path
    moe: Path

    def path(self, name: str) -> Path:
        return {DENSE: self.dense, MOE: self.moe}[name]


def default_cache_dir() -> Path:
    env = os.environ.get("LLMTRACE_MODEL_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmtrace" / "models"


def recipe_hash(name: str) -> str:
    """Hash of everything that determines a model's bytes, so stale caches are never reused."""
    blob = json.dumps(
        {"v": RECIPE_VERSION, "recipe": MODEL_RECIPES[name], "vocab": VOCAB_SIZE,
         "special": SPECIAL_TOKENS, "template": CHAT_TEMPLATE, "corpus": _WORDS},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_WORDS = [
    'the', 'a', 'an', 'model', 'token', 'cache', 'request', 'queue', 'prefill', 'decode',
    'batch', 'expert', 'router', 'latency', 'throughput', 'kernel', 'tensor', 'layer',
    'attention', 'memory', 'block', 'chunk', 'stream', 'server', 'client', 'trace', 'span',
    'metric', 'cost', 'tenant', 'version', 'engine', 'worker', 'scheduler', 'is', 'was',
    'will', 'can', 'may', 'should', 'runs', 'waits', 'moves', 'splits', 'joins', 'sends',
    'reads', 'writes', 'fast', 'slow', 'small', 'large', 'first', 'last', 'next', 'every',
    'some', 'many', 'few', 'one', 'two', 'three', 'four', 'and', 'or', 'but', 'so',
    'because', 'when', 'while', 'after', 'before', 'of', 'to', 'in', 'on', 'at', 'for',
    'with', 'from', 'hello', 'world', 'please', 'explain', 'summarize', 'translate',
    'write', 'answer', 'question', 'story', 'time', 'data', 'system', 'user', 'assistant',
    'number', 'value', 'result', 'error', 'success', 'failure',
]


def _corpus(lines: int = 20000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(lines):
        n = rng.randint(4, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        yield sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ","])


def build_tokenizer(out_dir: Path) -> None:
    """Train a byte-level BPE offline and save it as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = _COMMON["max_position_embeddings"]
    fast.save_pretrained(out_dir)


def build_model(name: str, out_dir: Path, tokenizer_dir: Path) -> None:
    """Initialise a random bf16 model from its recipe and save it beside a tokenizer copy."""
    import torch
    import transformers

    recipe = MODEL_RECIPES[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if recipe["arch"] == "llama":
        config = transformers.LlamaConfig(**recipe["config"], **ids)
        model_cls = transformers.LlamaForCausalLM
    elif recipe["arch"] == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**recipe["config"], **ids)
        model_cls = transformers.Qwen3MoeForCausalLM
    else:  # pragma: no cover - recipes are a closed set
        raise ValueError(f"unknown architecture {recipe['arch']!r} for model {name!r}")
    config.dtype = torch.bfloat16
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16).eval()
    model.generation_config = transformers.GenerationConfig(**ids)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ready(path: Path) -> bool:
    return (path / ".complete").exists()


def ensure_models(cache_dir: Path | None = None, *, verbose: bool = False) -> TinyModels:
    """Return the tiny models, generating any that are missing (about 10 s, once)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    targets = {name: cache_dir / f"{name}-{recipe_hash(name)}" for name in MODEL_RECIPES}
    if not all(_ready(p) for p in targets.values()):
        with _locked(cache_dir):
            missing = {n: p for n, p in targets.items() if not _ready(p)}
            if missing:
                _generate(cache_dir, missing, verbose=verbose)
    return TinyModels(dense=targets[DENSE], moe=targets[MOE])


def _generate(cache_dir: Path, missing: dict[str, Path], *, verbose: bool) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        build_tokenizer(tok_dir)
        for name, final in missing.items():
            staging = Path(tmp) / name
            build_model(name, staging, tok_dir)
            (staging / ".complete").write_text(recipe_hash(name))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)  # same filesystem: atomic publish
            if verbose:
                print(f"generated {name} -> {final}")
    if verbose:
        print(f"model generation took {time.monotonic() - started:.1f} s")


def biased_moe(src: Path, dst: Path, expert: int, strength: float = 8.0) -> Path:
    """A copy of the MoE model whose routers send every token to ``expert`` (plus one).

    Random weights route tokens evenly-ish, so a skew is built in: every token's
    embedding gets a large constant component in hidden dimension 0, which survives
    the tiny residual stream's updates; each layer's router weighs that dimension
    ``+strength`` for ``expert`` and ``-strength`` for the others. The test can then
    expect that expert in every token's top-k in every layer: half the assignments
    with top-2, an imbalance of experts / top_k.
    """
    from safetensors.torch import load_file, save_file

    if _ready(dst):
        return dst
    staging = dst.with_name(dst.name + ".build")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(src, staging)
    weights = load_file(str(staging / "model.safetensors"))
    weights["model.embed_tokens.weight"][:, 0] = 4.0
    for name, w in weights.items():
        if name.endswith("mlp.gate.weight"):  # [experts, hidden]
            w[:, 0] = -strength
            w[expert, 0] = strength
    save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / ".complete").write_text(f"biased to expert {expert}")
    if dst.exists():
        shutil.rmtree(dst)
    staging.rename(dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    models = ensure_models(args.cache_dir, verbose=True)
    print(f"dense: {models.dense}\nmoe:   {models.moe}")


if __name__ == "__main__":
    main()

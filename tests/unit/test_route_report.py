"""tools/route_report.py and files/probes.py: probes measured on a real server, reports kept."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.route_report import REPO, ReportError, build_report, main, run_probes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def probe(name, prompt, cached, out, wall, ttft):
    return {"name": name, "label": name, "prompt_tokens": prompt, "cached_tokens": cached,
            "output_tokens": out, "wall_s": wall, "ttft_s": ttft,
            "prefill_tok_s": (prompt - cached) / ttft, "decode_tok_s": (out - 1) / (wall - ttft),
            "total_tok_s": (prompt + out) / wall, "finish_reason": "stop", "answer": "x"}


def probes_json(ratio_followup_ttft: float = 0.2) -> dict:
    """A probes document as files/probes.py writes it (shape only; numbers invented)."""
    return {
        "schema": 1, "host": "studio", "system": "Darwin 25.0 arm64",
        "started_at": "2026-11-27T10:00:00+00:00", "duration_s": 60.0,
        "profile": "glm-5.2-mxfp4", "public_name": "glm-5.2", "via": "proxy",
        "endpoint": "http://127.0.0.1:8026",
        "sizes": {"needle_tokens": 4500, "cache_tokens": 1600, "integers": 128,
                  "prose_words": 220},
        "probes": [probe("tiny", 11, 0, 3, 6.1, 5.0), probe("needle", 4510, 0, 8, 39.5, 38.0),
                   probe("cache_cold", 1700, 0, 4, 16.0, 15.0),
                   probe("cache_followup", 1730, 1700, 4, 1.5, ratio_followup_ttft)],
        "limits": {"cache_followup_max_ratio": 0.1},
        "prefix_cache": {"cold_prompt_tokens": 1700, "cold_ttft_s": 15.0,
                         "followup_prompt_tokens": 1730, "followup_cached_tokens": 1700,
                         "followup_ttft_s": ratio_followup_ttft,
                         "ratio": round(ratio_followup_ttft / 15.0, 4)},
        "memory": {"host_total_bytes": 512 * 2**30, "server_pid": 4242,
                   "server_pid_from": "launchd", "server_command": ["python", "-m", "mlx_lm"],
                   "rss_loaded_bytes": 309 * 2**30, "rss_peak_sampled_bytes": 312 * 2**30,
                   "rss_samples": 200, "rss_after_bytes": 311 * 2**30, "rss_hwm_bytes": None,
                   "mlx_peak_bytes": None, "mlx_peak_note": "not measured: ..."},
        "disk": {"model_dir": "/Users/milo/models/glm", "apparent_bytes": 368 * 10**9,
                 "allocated_bytes": 368 * 10**9, "files": 80},
    }


def check_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 5000, f"{path.name} is suspiciously small ({len(data)} bytes)"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300, pixels.shape
    assert pixels[..., :3].std() > 0.05, f"{path.name} is (nearly) blank"


def test_each_run_gets_its_own_folder_and_the_page_lists_earlier_runs(tmp_path):
    first = build_report(probes_json(), tmp_path, stamp="20261127T100000Z")
    later = copy.deepcopy(probes_json())
    later["probes"][0]["wall_s"] = 4.54
    second = build_report(later, tmp_path, stamp="20261128T100000Z")
    assert first.parent == second.parent == tmp_path / "studio"
    page = (second / "report.md").read_text()
    assert "| 20261127T100000Z | 6.10 |" in page and "| 20261128T100000Z | 4.54 |" in page
    for name in ("tokens_per_s.png", "prefill_vs_length.png", "prefix_cache.png"):
        assert f"]({name})" in page
        check_png(second / name)
    with pytest.raises(ReportError, match="never overwritten"):
        build_report(probes_json(), tmp_path, stamp="20261127T100000Z")


def test_page_keeps_disk_rss_and_mlx_peak_apart_and_says_what_was_not_measured(tmp_path):
    page = (build_report(probes_json(), tmp_path, stamp="s1") / "report.md").read_text()
    assert "| Weights on disk | 342.73 GiB" in page
    assert "| Server RSS after load | 309.00 GiB" in page
    assert "| Server RSS peak during probes | 312.00 GiB" in page
    assert "| MLX peak | n/a | not measured" in page


def test_a_slow_cached_follow_up_fails_the_profiles_limit(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(probes_json(ratio_followup_ttft=0.9)))  # 0.06 of 15 s
    bad.write_text(json.dumps(probes_json(ratio_followup_ttft=6.0)))  # 0.4 of 15 s
    assert main(["--from-json", str(good), "--out", str(tmp_path / "r")]) == 0
    assert main(["--from-json", str(bad), "--out", str(tmp_path / "r2")]) == 2
    report = json.loads(next((tmp_path / "r2").glob("*/*/report.json")).read_text())
    assert report["verdicts"]["cache_followup"] == {"ratio": 0.4, "max_ratio": 0.1, "ok": False}
    assert "**FAIL**" in next((tmp_path / "r2").glob("*/*/report.md")).read_text()


def test_probes_refuse_a_file_that_is_not_a_route_manifest(tmp_path):
    bogus = tmp_path / "route.json"
    bogus.write_text("{}")
    run = subprocess.run([sys.executable, str(REPO / "files" / "probes.py"),
                          "--manifest", str(bogus)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert "has no 'smoke'" in run.stderr and "run the deploy again" in run.stderr


@pytest.mark.slow
def test_probes_of_a_real_server_through_the_proxy_make_a_full_report(
        mlx_server, proxy_factory, tmp_path):
    """files/probes.py runs on `local://` as the deploy runs it (its own process, sent
    through testinfra), through the real proxy to a real mlx_lm.server; small sizes."""
    from group_data.all import model_profiles

    prof = model_profiles["smollm2-135m"]
    proxy = proxy_factory(mlx_server.url, "--public-name", prof["public_name"])
    manifest = {
        "profile": "smollm2-135m", "public_name": prof["public_name"], "smoke": prof["smoke"],
        "model_dir": str(mlx_server.model_path), "shards": 1,
        "server": {"host": "127.0.0.1", "port": mlx_server.port},
        "proxy": {"host": "127.0.0.1", "port": proxy.port, "key_file": None},
        # no service manager here: the probes find the server by its port
        "backend": None, "backend_ctl": None, "services": {},
        "venv": sys.prefix, "gates": prof["gates"],
        "bench": {"needle_tokens": 120, "cache_tokens": 240, "integers": 8, "prose_words": 16,
                  "timeout_s": 600},
    }
    path = tmp_path / "route.json"
    path.write_text(json.dumps(manifest))

    data = run_probes("local://", str(path))

    by_name = {p["name"]: p for p in data["probes"]}
    assert list(by_name) == ["tiny", "integers", "prose", "needle", "cache_cold",
                             "cache_followup"]
    for p in data["probes"]:
        assert p["prompt_tokens"] > 0 and p["output_tokens"] >= 1, p
        assert 0 < p["ttft_s"] <= p["wall_s"], p
    assert prof["smoke"]["expect"] in by_name["tiny"]["answer"]
    assert by_name["needle"]["prompt_tokens"] > 100
    assert by_name["integers"]["decode_tok_s"] > 0
    cache = data["prefix_cache"]
    assert cache["followup_cached_tokens"] >= cache["cold_prompt_tokens"] // 2, cache
    assert cache["followup_ttft_s"] < cache["cold_ttft_s"], cache

    mem, disk = data["memory"], data["disk"]
    assert mem["server_pid"] == mlx_server.proc.pid
    weights = (mlx_server.model_path / "model.safetensors").stat().st_size
    assert disk["apparent_bytes"] >= weights
    # float32 weights are mapped in: the loaded server is at least most of their size
    assert mem["rss_loaded_bytes"] > weights // 2
    assert mem["rss_peak_sampled_bytes"] >= mem["rss_loaded_bytes"] and mem["rss_samples"] > 0
    # The kernel batches its per-thread RSS counters, so VmHWM can trail a VmRSS
    # sample by a few pages (seen: 4 KiB); it is never meaningfully below it.
    assert mem["rss_hwm_bytes"] >= mem["rss_peak_sampled_bytes"] * 0.99
    assert mem["mlx_peak_bytes"] is None and "not measured" in mem["mlx_peak_note"]
    assert "--prompt-cache-bytes" in mem["server_command"]

    out = build_report(data, tmp_path / "reports", host_name="here", stamp="run1")
    for name in ("tokens_per_s.png", "prefill_vs_length.png", "prefix_cache.png"):
        check_png(out / name)
    page = (out / "report.md").read_text()
    assert "| Tiny warm request |" in page and "| run1 |" in page
    assert json.loads((out / "report.json").read_text())["probes"] == data["probes"]


def test_a_cluster_report_shows_its_ranks_and_its_rates_beside_one_ranks(tmp_path):
    """route.json's cluster part comes through the probes; --single-rank puts the
    prefill and decode rates of one rank (a report of the same profile) beside them."""
    cluster = probes_json()
    cluster["cluster"] = {"size": 3, "backend": "ring", "parallel": "tensor",
                          "local_ranks": [0, 1], "serves_http": True,
                          "ranks": [{"rank": 0, "host": "10.231.1.2", "ip": "10.231.250.1"},
                                    {"rank": 1, "host": "10.231.1.2", "ip": "10.231.250.1"},
                                    {"rank": 2, "host": "10.231.2.2", "ip": "10.231.250.2"}]}
    single = probes_json()
    single["host"] = "one-rank"
    single["probes"][1] = probe("needle", 4510, 0, 8, 20.0, 19.0)  # prefill 237.37, decode 7.0
    (tmp_path / "cluster.json").write_text(json.dumps(cluster))
    (tmp_path / "single.json").write_text(json.dumps(single))
    assert main(["--from-json", str(tmp_path / "cluster.json"), "--out", str(tmp_path / "r"),
                 "--single-rank", str(tmp_path / "single.json")]) == 0
    page = next((tmp_path / "r").glob("*/*/report.md")).read_text()
    assert "3 ranks, `ring` backend, tensor parallelism; this host runs rank(s) 0, 1" in page
    assert "| 2 | 10.231.2.2 | 10.231.250.2 |" in page
    assert "one-rank at 2026-11-27T10:00:00+00:00" in page
    assert "| needle | 118.68 | 237.37 | 4.67 | 7.00 |" in page
    report = json.loads(next((tmp_path / "r").glob("*/*/report.json")).read_text())
    assert report["single_rank"]["rates"]["needle"] == {"prefill_tok_s": 4510 / 19.0,
                                                       "decode_tok_s": 7.0}
    # without one rank's report the section says how to add it; a wrong file is refused
    page = (build_report(cluster, tmp_path / "r3", stamp="s") / "report.md").read_text()
    assert "| needle | 118.68 | n/a | 4.67 | n/a |" in page and "--single-rank" in page
    with pytest.raises(ReportError, match="profile 'other'"):
        build_report(cluster, tmp_path / "r4", single_rank={**single, "profile": "other"})
    with pytest.raises(ReportError, match="of one server"):
        build_report(single, tmp_path / "r5", single_rank=single)
    assert "## Cluster" not in (build_report(single, tmp_path / "r6", stamp="s") /
                                "report.md").read_text()

"""experiments.paper_comparison: every per-token number of the paper gets a row, errors are computed right (issue 26).

Fast: the row bookkeeping is checked on the whole paper file without simulating; the simulation on a few OPT-6.7B
rows with 8 tokens."""

import json
import math

import pytest

from experiments import paper_comparison as pc


@pytest.fixture(scope="module")
def paper():
    return pc.load_paper()


@pytest.fixture(scope="module")
def skeleton(paper):
    return pc.paper_rows(paper)


def test_every_paper_latency_has_a_row(paper, skeleton):
    for e in paper["latencies"]:
        key = (e["model"], e["device"], e["policy"], e["part"])
        mine = [r for r in skeleton if (r["model"], r["paper_device"], r["policy"], r["part"]) == key]
        assert mine, f"no row for {key} ({e['source']})"
        value = e.get("paper_ms")
        if "Table 5" in e["source"] and any(r["table"] == "Table 3" for r in mine):
            # folded into its Table 3 cell, compared once
            assert any(r["table5_ms"] == value and r["table5_std_ms"] == e["paper_std_ms"] for r in mine)
        elif value is not None:
            assert any(r["paper_ms"] == value and r["source"].startswith(e["source"]) for r in mine)
        else:
            bound = e.get("paper_ms_upper_bound", e.get("paper_ms_lower_bound"))
            assert any(r["paper_bound"] and r["paper_bound"].endswith(str(bound)) for r in mine)


def test_every_io_ablation_row_has_a_row(paper, skeleton):
    t2 = [r for r in skeleton if r["table"] == "Table 2"]
    assert len(t2) == len(paper["io_ablation"])
    for e, r in zip(paper["io_ablation"], t2):
        assert (r["policy"], r["part"], r["paper_ms"], r["paper_gb"], r["paper_gbps"]) == \
               (e["policy"], "io", e["io_ms"], e["flash_to_dram_gb"], e["throughput_gbps"])
        assert r["_job"].dtype == "float16"      # Table 2 is titled '16 bit'
    assert t2[0]["_job"].min_budget and not t2[1]["_job"].min_budget   # naive with nothing in DRAM vs hybrid


def test_table3_is_primary_and_text_rows_stay_separate(paper, skeleton):
    tables = [r["table"] for r in skeleton]
    assert "Table 5" not in tables
    t3 = [e for e in paper["latencies"] if "Table 3" in e["source"]]
    assert sum(t == "Table 3" for t in tables) == len(t3) > 80
    text = [e for e in paper["latencies"] if "Table" not in e["source"]]
    assert sum(t == "text" for t in tables) == len(text) > 10
    v12 = [r for r in skeleton if r["source"].startswith("v1/v2")]
    assert sorted(r["paper_ms"] for r in v12) == [65, 125]


def test_the_mapping_of_devices_policies_and_windows(paper, skeleton):
    assert {e["device"] for e in paper["latencies"]} <= set(pc.DEVICES)
    jobs = {(r["model"], r["policy"], r["paper_device"]): r["_job"] for r in skeleton if r["_job"]}
    assert jobs[("opt-6.7b", "all", "m1-max-cpu")].window == 5
    assert jobs[("falcon-7b", "all", "m1-max-cpu")].window == 4
    assert jobs[("llama-2-7b", "all", "m1-max-cpu")].window == 2
    assert jobs[("opt-6.7b", "all", "rtx-4090-24gb")] == pc.Job("opt-6.7b", "rtx4090-paper", "bfloat16",
                                                               "windowing_bundling", 5, 0.5, "opt-6.7b-paper")
    assert jobs[("phi-2", "naive", "m1-max-cpu")].memory_budget == 0.65
    hyb, nai = jobs[("falcon-7b", "hybrid", "m1-max-cpu")], jobs[("falcon-7b", "naive", "m1-max-cpu")]
    assert hyb == nai            # Flashlab has one dense baseline
    spec = [r for r in skeleton if r["policy"] == "speculative"]
    assert spec and all(r["_job"] is None and r["status"] == "not modelled" for r in spec)


def test_ffn_cap_is_the_papers(paper):
    caps = {s["model"]: s["value"] for s in paper["shares"] if s.get("quantity") == "ffn_dram_cap"}
    assert pc.FFN_CAP == caps


def test_errors():
    assert pc.errors(100.0, 110.0) == (pytest.approx(10.0), pytest.approx(10.0))
    assert pc.errors(200.0, 50.0)[0] == pytest.approx(-75.0)
    assert pc.errors(0, 3.5) == (None, 3.5)          # the paper says 0 ms: the difference, not a percentage
    assert pc.errors(None, 3.5) == (None, None)
    assert pc.errors(10.0, None) == (None, None)


@pytest.fixture(scope="module")
def simulated():
    keep = lambda r: (r["model"] == "opt-6.7b" and r["paper_device"] == "m1-max-cpu"
                      and r["policy"] in ("naive", "all") and r["table"] in ("Table 3", "text")) \
        or r["policy"] == "speculative" and r["part"] == "total"
    return pc.compare(tokens=8, warmup=2, workers=1, select=keep)


def test_rows_are_simulated_and_errors_consistent(simulated):
    ok = [r for r in simulated if r["status"] == "ok"]
    assert len(ok) >= 12
    for r in ok:
        assert r["hardware"] == "m1-max" and r["dtype"] == "float32" and r["sim_ms"] is not None
        if r["paper_ms"]:
            assert r["err_pct"] == pytest.approx((r["sim_ms"] - r["paper_ms"]) / r["paper_ms"] * 100, abs=0.02)
            assert (r["explanation"] is not None) == (abs(r["err_pct"]) > pc.OFF)
        elif r["paper_ms"] == 0:
            assert r["err_pct"] is None and r["abs_diff_ms"] == pytest.approx(r["sim_ms"])
        else:
            assert r["bound_holds"] in (True, False)
    parts = {(r["policy"], r["part"]): r["sim_ms"] for r in ok if r["table"] == "Table 3"}
    assert parts[("all", "total")] == pytest.approx(parts[("all", "io")] + parts[("all", "mem")] + parts[("all", "compute")],
                                                    rel=1e-3)   # overlap off: the parts add up, as in the paper
    assert parts[("naive", "io")] > 10 * parts[("all", "io")]
    spec = [r for r in simulated if r["policy"] == "speculative"]
    assert spec and spec[0]["sim_ms"] is None and "not modelled" in spec[0]["explanation"]


def test_outputs_have_fixed_keys(simulated, tmp_path):
    recs = pc.records(simulated)
    assert all(list(r) == pc.KEYS for r in recs)
    assert all(r["device"] == pc.DEVICE and r["date"] for r in recs)
    json.dumps(recs)   # plain values only
    pc.write_csv(simulated, tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text().splitlines()[0].split(",") == pc.KEYS
    md = pc.to_markdown(simulated, 8, 2, "2026-12-06", 1.0)
    assert "## opt-6.7b on m1-max-cpu" in md and "Rows off by more than 15%" in md
    for r in simulated:
        if r["err_pct"] is not None:
            assert f"{r['err_pct']:+.1f}" in md
    assert not any(isinstance(v, float) and math.isnan(v) for r in recs for v in r.values())

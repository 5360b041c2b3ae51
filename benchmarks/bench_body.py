"""The trace engine's per-layer front (attention, FFN norm, predictor) with the project's kernels vs plain torch.

    python benchmarks/bench_body.py [--models opt-6.7b,llama-2-7b] [--out benchmarks]

`real.engine.SyntheticBody(kernel="auto")` runs the attention's residual add and the FFN norm as one fused
add + LayerNorm launch and the rank-128 predictor as `predict_active` (device index list, no host sync), both
with programmatic dependent launch on Hopper; `kernel="torch"` keeps addmm + layer_norm and (x A) B > 0. This
builds both bodies with the same random weights (fp16, batch 1) and, per model:

1. checks the kernels' outputs: h and the FFN input against the torch body's (fp16 rounding), and the set
   the graphed front predicted against float64 scores of its FFN input (a neuron may fall on the other side
   of the threshold only within fp32 rounding of its score); a model that fails is not timed (exit 1);
2. times, by CUDA-graph replay of every layer back to back (bench_kernels.graph_ms: median of 25 replays),
   the whole front per layer, then its two changed parts alone (add + norm; the predictor, layers back to
   back);
3. times the front as the engine runs it: one graph replay per layer launched from Python, then a sync, over
   all layers for 16 tokens (wall time per layer, median of 5 rounds after one untimed, the variants
   alternating).

Writes DIR/results/body.txt and DIR/results/body.json."""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_kernels import graph_ms  # noqa: E402
from _results import write_outputs  # noqa: E402
from real.engine import SyntheticBody  # noqa: E402
from real.kernels.predictor import misclassified  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402

RANK, TOKENS, ROUNDS = 128, 16, 5
H_EPS, X_EPS = 2, 4       # one extra fp16 rounding of o @ wo in h; normalising scales it by |h|/std
VARIANTS = ("torch", "auto")          # SyntheticBody's kernel=


def check(plain: SyntheticBody, fused: SyntheticBody, pos: int) -> dict:
    """Largest errors of the kernels' front against the torch body's, and the predictor's set against float64."""
    spec, eps = plain.spec, torch.finfo(plain.emb.dtype).eps
    g = torch.Generator(plain.device).manual_seed(1)
    worst = {"h_eps": 0.0, "x_eps": 0.0, "neurons_off": 0, "neurons_off_beyond_rounding": 0, "active": 0}
    for l in range(spec.n_layers):
        h = (torch.randn(1, spec.d_model, device=plain.device, generator=g) * 0.5).to(plain.emb.dtype)
        h_p, x_p = (t.clone() for t in plain.front(l, h, pos, True))
        h_f, x_f = (t.clone() for t in fused.front(l, h, pos, True))
        idx, count = fused.predicted                      # what the graph (with PDL) predicted from x_f
        # in units of the dtype's eps times the tensor's largest magnitude
        worst["h_eps"] = max(worst["h_eps"], (h_f.float() - h_p.float()).abs().max().item()
                              / (eps * h_p.float().abs().max().item()))
        worst["x_eps"] = max(worst["x_eps"], (x_f.float() - x_p.float()).abs().max().item()
                              / (eps * x_p.float().abs().max().item()))
        off, beyond = misclassified(x_f, *fused.pred[l], idx, count)
        worst["neurons_off"] += off
        worst["neurons_off_beyond_rounding"] += beyond
        worst["active"] += int(count.item())
    return worst


def graphed_us(body: SyntheticBody, sparse: bool) -> dict:
    """Device time per layer: every layer's front, then each changed part alone, all layers in one graph."""
    spec = body.spec
    h = (torch.randn(1, spec.d_model, device=body.device) * 0.5).to(body.emb.dtype)
    o = (torch.randn(1, spec.d_model, device=body.device) * 0.5).to(body.emb.dtype)
    x = body.ffn_input(0, h)
    layers = range(spec.n_layers)
    out = {"front": graph_ms([lambda l=l: body.front_eager(l, h, body._pos, sparse) for l in layers]) * 1e3,
           "add_norm": graph_ms([lambda l=l: body._attend_and_norm(l, h, o) for l in layers]) * 1e3}
    if sparse:
        out["predictor"] = graph_ms([lambda l=l: body.predictor(l, x) for l in layers]) * 1e3
    return out


def engine_us(bodies: dict, sparse: bool, rounds: int = ROUNDS) -> dict:
    """Wall time per layer of `front` as TraceEngine calls it (a graph replay per layer, a sync per layer: the
    engine syncs before the layer's reads), median of `rounds` rounds of TOKENS tokens, variants alternating."""
    times = {k: [] for k in bodies}
    spec = next(iter(bodies.values())).spec
    for _ in range(rounds):
        for k, body in bodies.items():
            h0 = (torch.randn(1, spec.d_model, device=body.device) * 0.5).to(body.emb.dtype)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for pos in range(TOKENS):
                h = h0
                for l in range(spec.n_layers):
                    h, _ = body.front(l, h, pos, sparse)
                    torch.cuda.current_stream().synchronize()
            times[k].append((time.perf_counter() - t) / (TOKENS * spec.n_layers) * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, stamp: dict, lines: list, records: list) -> bool:
    """Check the kernels' front against torch and float64, then (only if it passed) time both bodies."""
    spec = ModelSpec.preset(name)
    dev = torch.device("cuda")
    bodies = {k: SyntheticBody(spec, dev, max_tokens=TOKENS, predictor_rank=RANK, seed=0, kernel=k)
              for k in VARIANTS}
    if not bodies["auto"].fused:
        raise SystemExit(f"{name}: the kernels do not run here (dtype {spec.dtype}, triton missing?)")
    ok = check(bodies["torch"], bodies["auto"], pos=TOKENS - 1)
    good = ok["h_eps"] <= H_EPS and ok["x_eps"] <= X_EPS and ok["neurons_off_beyond_rounding"] == 0
    first = len(lines)
    lines.append(f"\n## {name}: {spec.n_layers} layers, d_model {spec.d_model}, d_ff {spec.d_ff}, rank {RANK}, "
                 f"{TOKENS} key slots")
    lines.append(f"check: h within {ok['h_eps']:.2f} eps (<= {H_EPS}), FFN input within {ok['x_eps']:.2f} eps "
                 f"(<= {X_EPS}) of the torch body's; the graphed predictor: {ok['active']} active over all layers, "
                 f"{ok['neurons_off']} on the other side of the threshold than float64, "
                 f"{ok['neurons_off_beyond_rounding']} beyond fp32 rounding: {'PASS' if good else 'FAIL'}")
    checked = {f"check_{k}": (round(v, 3) if isinstance(v, float) else v) for k, v in ok.items()}
    if not good:
        records.append({**stamp, "model": name, "batch": 1, "part": "check", **checked, "correct": False})
        print("\n".join(lines[first:]), flush=True)
        return False
    lines.append(f"{'part (us per layer)':<44}{'torch':>9}{'kernels':>9}{'saved':>9}{'ratio':>8}")
    for sparse in (True, False):
        dev_t = {k: graphed_us(b, sparse) for k, b in bodies.items()}
        engine_us(bodies, sparse, rounds=1)              # warm-up: captures the per-layer graphs
        eng_t = engine_us(bodies, sparse)
        tag = "sparse (with predictor)" if sparse else "dense (no predictor)"
        rows = [(f"front, graphed, {tag}", dev_t["torch"]["front"], dev_t["auto"]["front"], "graph"),
                ("  add + norm alone", dev_t["torch"]["add_norm"], dev_t["auto"]["add_norm"], "graph")]
        if sparse:    # back to back, so the kernels' PDL overlaps one layer's predictor with the next's
            rows.append(("  predictor alone, back to back", dev_t["torch"]["predictor"], dev_t["auto"]["predictor"],
                         "graph"))
        rows.append((f"front as the engine runs it, {tag.split()[0]}", eng_t["torch"], eng_t["auto"], "engine"))
        for label, t_torch, t_ours, timing in rows:
            lines.append(f"{label:<44}{t_torch:9.2f}{t_ours:9.2f}{t_torch - t_ours:9.2f}{t_torch / t_ours:8.2f}")
            records.append({**stamp, "model": name, "batch": 1, "sparse": sparse, "part": label.strip(),
                            "timing": timing, "torch_us": round(t_torch, 3), "kernels_us": round(t_ours, 3),
                            "saved_us_per_token": round((t_torch - t_ours) * spec.n_layers, 2), **checked,
                            "correct": good})
    print("\n".join(lines[first:]), flush=True)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--models", default="opt-6.7b,llama-2-7b", help="comma-separated model presets")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_body.py times CUDA launches: run it on a machine with an NVIDIA GPU")
    stamp = {"device": torch.cuda.get_device_name(),
             "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    lines = [f"# SyntheticBody front, kernel='torch' vs 'auto' (fused add+LayerNorm, Triton predictor, PDL), "
             f"fp16 batch 1: {stamp['device']}, {stamp['date']}",
             "# graphed: all layers in one CUDA graph, median of 25 replays; engine: a replay + sync per layer, "
             f"wall time, median of {ROUNDS} rounds of {TOKENS} tokens"]
    records: list = []
    passed = True
    for name in args.models.split(","):
        passed = bench_model(name, stamp, lines, records) and passed
        write_outputs(args.out, "body", lines, records)        # after each model: a crash keeps the rest
        torch.cuda.empty_cache()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

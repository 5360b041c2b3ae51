"""How much could a smarter use of the memory budget save? Bytes read per token by eviction rules
of growing knowledge, at the neuron-cache capacity the policy engine gives (OPT-6.7B, budget 0.5,
the paper-calibrated synthetic trace that benchmarks/bench_engine.py runs).

    python benchmarks/bench_cache_bound.py [--model opt-6.7b] [--tokens 64] [--long 512]

Rules (each keeps the current token's active neurons resident and at most ``capacity`` rows):
  window      policy.eviction=window, planned by the policy engine: the union of the last k tokens
  lru         policy.eviction=lru (policy engine): fill the cache, evict the least recently active
  lfu         policy.eviction=lfu (policy engine): evict the least often active so far (outside the window first)
  frequency   policy.eviction=frequency (policy engine): evict the least often active, window or not
  freq+warm   frequency with policy.warm_start (policy engine): the cache filled at the first token with the
              neurons an activation profile ranks hottest (--calibration-tokens run before the trace, not
              measured: what an offline calibration run gives), and the counts started from it
  static-hot  (here only) pin the neurons with the highest firing rate over the whole trace (known in
              advance, as an offline profile would give); the most recently active fill the rest
  belady      (a bound, here only) keep the neurons whose next activation comes first, and decline to
              keep any other: needs the future; no rule at this capacity can read fewer neurons

No torch, no GPU: the ceiling on "speedup vs naive" it prints takes the naive latency and the read
rate at 16 KiB (the policy's bytes over its own I/O bound) from one run in benchmarks/results/engine.json.
Writes benchmarks/results/cache_bound.txt, cache_bound.png and cache_bound.json."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import write_results  # noqa: E402
from sim.atomic import atomic_write_text  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.plan import PolicyEngine, ffn_cache_neurons  # noqa: E402
from sim.policy import Policy  # noqa: E402
from sim.trace import SyntheticTraceConfig, generate_trace  # noqa: E402

RULES = ("window", "lru", "lfu", "frequency", "freq+warm", "static-hot", "belady")
POLICY_RULES = {"window": {"eviction": "window"}, "lru": {"eviction": "lru"}, "lfu": {"eviction": "lfu"},
                "frequency": {"eviction": "frequency"}, "freq+warm": {"eviction": "frequency", "warm_start": True}}


def next_use(active: np.ndarray) -> np.ndarray:
    """[T, F]: for each token t, the next token > t at which each neuron is active (T if never)."""
    T, F = active.shape
    out = np.empty((T, F), dtype=np.int64)
    nxt = np.full(F, T, dtype=np.int64)
    for t in range(T - 1, -1, -1):
        out[t] = nxt
        nxt = np.where(active[t], t, nxt)
    return out


def policy_loads(spec: ModelSpec, policy: Policy, trace) -> np.ndarray:
    """Neurons read per token (all layers) by the policy engine's own plans."""
    return np.array([sum(lp.load.size for lp in token) for token in PolicyEngine(spec, policy).plan_trace(trace)])


def bound_loads(active: np.ndarray, rule: str, capacity: int, window: int) -> np.ndarray:
    """Neurons read at each token of one layer (``active``: bool [T, F]) under a bound that is
    not a policy; both keep at most ``capacity`` neurons between tokens, like the policies.

    static-hot: the hottest neurons over the whole trace (rates known in advance) pinned, the rest of
    the capacity filled with the most recently active ones (a window that shrinks to fit).
    belady: after each token, of everything in memory (the cache and this token's reads) keep the
    ``capacity`` neurons whose next activation comes first -- the optimum for a cache that may also
    decline to keep a neuron it had to read (no rule can read fewer neurons)."""
    T, F = active.shape
    loads = np.zeros(T, dtype=np.int64)
    cache = np.zeros(F, dtype=bool)
    last = np.full(F, -1, dtype=np.int64)
    pinned = np.zeros(F, dtype=bool)
    nxt = next_use(active) if rule == "belady" else None
    if rule == "static-hot":
        n_win = int(np.ceil(active.sum(1).mean() * window))      # room a k-token window needs on average
        pinned[np.argsort(-active.sum(0), kind="stable")[: max(0, capacity - n_win)]] = True
    for t in range(T):
        need = active[t]
        loads[t] = int(np.count_nonzero(need & ~cache))
        last[need] = t
        held = np.flatnonzero(cache | need)
        if held.size <= capacity:
            cache[held] = True
            continue
        if rule == "belady":
            key = nxt[t][held]                                     # soonest next use first
        else:                                                      # pinned first, then most recent
            key = np.where(pinned[held], -1, T - last[held])
        cache[:] = False
        cache[held[np.argsort(key, kind="stable")[:capacity]]] = True
    return loads


def measured_reference(root: Path, policy: str) -> dict:
    """From one committed GPU run of bench_engine, medians over its rounds: naive ms/token, and the policy's
    effective read rate (its bytes per token over its own I/O lower bound, i.e. the probe at its read size
    and depth)."""
    try:
        eng = json.loads((root / "results" / "engine.json").read_text())
    except (OSError, ValueError):
        return {}
    naive = [r for r in eng if r.get("policy") == "naive"]
    mine = [r for r in eng if r.get("policy") == policy and r.get("io_lower_bound_ms")]
    if not naive or not mine:
        return {}
    r = mine[0]
    return {"naive_ms": float(np.median([x["latency_ms"] for x in naive])),
            "gbps": float(np.median([float(x["bytes_per_token"]) / 1e6 / float(x["io_lower_bound_ms"]) for x in mine])),
            "source": f"benchmarks/results/engine.json ({r.get('device')}, {r.get('date')}, medians of "
                      f"{len(naive)} naive and {len(mine)} {policy} rounds)"}


def plot(records: list[dict], ref: dict, out: Path, title: str, name: str = "cache_bound") -> None:
    """Bars of MB read per token per rule and trace length, with the bytes that 20x naive allows."""
    from experiments import plots

    plt = plots._plt()
    lengths = sorted({r["tokens"] for r in records})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(lengths)
    for k, n in enumerate(lengths):
        rows = [r for r in records if r["tokens"] == n]
        ax.bar([i + k * width for i in range(len(rows))], [r["mb_per_token"] for r in rows], width,
               label=f"{n} tokens")
    ax.set_xticks([i + width * (len(lengths) - 1) / 2 for i in range(len(RULES))], RULES)
    if "gbps" in ref and "naive_ms" in ref:
        mb20 = ref["naive_ms"] / 20 * ref["gbps"]
        ax.axhline(mb20, color="k", ls="--", lw=1)
        ax.text(-0.4, mb20 + 3, f"20x naive at zero overhead: {mb20:.0f} MB/token", ha="left", va="bottom",
                fontsize=9)
    ax.set_ylabel("MB read from flash per token")
    ax.set_xlabel("eviction rule (window .. freq+warm: policy engine; static-hot, belady: outside it, belady the bound)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(r["mb_per_token"] for r in records) * 1.18)
    ax.legend(loc="upper right")
    fig.tight_layout()
    plots.save(fig, out, name, formats=("png",))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--policy", default="windowing_bundling")
    ap.add_argument("--tokens", type=int, default=64, help="measured tokens (bench_engine's count)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--long", type=int, default=512, help="a second, longer trace (0: skip)")
    ap.add_argument("--calibration-tokens", type=int, default=512,
                    help="tokens counted before each trace: the activation profile of freq+warm (bench_engine's)")
    ap.add_argument("--trace", default="synthetic", help="synthetic trace preset (conf/trace/); a paper preset's "
                    "predicted sets are what the layers read (policy.predictor=trace)")
    ap.add_argument("--reference-step", default=None,
                    help="bench_engine step whose read rate (bytes over its own I/O bound) sets the io bound "
                         "(default: --policy)")
    ap.add_argument("--name", default="cache_bound", help="results/<name>.json, .txt, .png")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    args = ap.parse_args(argv)

    spec = ModelSpec.preset(args.model)
    policy = Policy.preset(args.policy)
    capacity = ffn_cache_neurons(spec, policy)
    ref = measured_reference(Path(args.out_dir), args.reference_step or args.policy)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    records = []
    for tokens in [args.tokens] + ([args.long] if args.long else []):
        T = args.warmup + tokens
        trace = generate_trace(spec, SyntheticTraceConfig.from_preset(
            args.trace, tokens=T, seed=0, calibration_tokens=args.calibration_tokens))
        for rule in RULES:
            if rule in POLICY_RULES:
                per_token = policy_loads(spec, dataclasses.replace(policy, **POLICY_RULES[rule]), trace)
            else:
                sets = trace.active if policy.predictor == "oracle" else trace.read_sets   # what layers read
                per_token = np.sum([bound_loads(sets[:, l], rule, capacity, policy.window)
                                    for l in range(spec.n_layers)], axis=0)
            neurons = float(per_token[args.warmup:].mean())
            mb = neurons * spec.neuron_bytes / 1e6
            rec = {"device": f"CPU {platform.machine()} (no device: a count)", "date": date, "model": spec.name,
                   "policy": args.policy, "memory_budget": policy.memory_budget, "capacity_neurons": capacity,
                   "tokens": tokens, "rule": rule, "new_neurons_per_token": round(neurons, 1),
                   "mb_per_token": round(mb, 2)}
            if "gbps" in ref:
                rec["io_bound_ms"] = round(mb / ref["gbps"], 1)          # MB / (GB/s) = ms
                if "naive_ms" in ref:
                    rec["ceiling_vs_naive"] = round(ref["naive_ms"] / rec["io_bound_ms"], 2)
            records.append(rec)
            print(f"{tokens:5d} tokens {rule:10s} {neurons:9.1f} neurons/token {mb:7.1f} MB/token", flush=True)

    base = {r["tokens"]: r["mb_per_token"] for r in records if r["rule"] == "window"}
    lines = [f"# Bytes per token under eviction rules of growing knowledge: {spec.name} {spec.dtype}, "
             f"{args.policy} (window {policy.window}), memory_budget {policy.memory_budget} -> "
             f"{capacity} of {spec.d_ff} neurons per layer cached",
             f"# synthetic trace conf/trace/{args.trace}.yaml (seed 0, after {args.calibration_tokens} calibration tokens "
             f"that only freq+warm's profile counts), first {args.warmup} tokens excluded; date {date}",
             f"# io bound = MB/token / {ref.get('gbps', float('nan')):.3f} GB/s (the probe at 16 KiB and 32 KiB in that run); "
             "ceiling = naive ms / io bound (an engine with zero overhead)",
             f"# measured inputs: naive {ref.get('naive_ms', float('nan')):.1f} ms/token and the read rate from "
             f"{ref.get('source', 'none (no engine.json)')}",
             "", f"{'tokens':>6} {'rule':>10} {'neurons/tok':>11} {'MB/tok':>8} {'vs window':>9} "
                 f"{'io bound ms':>11} {'ceiling x':>9}"]
    for r in records:
        lines.append(f"{r['tokens']:>6} {r['rule']:>10} {r['new_neurons_per_token']:>11.1f} {r['mb_per_token']:>8.1f} "
                     f"{r['mb_per_token'] / base[r['tokens']]:>9.3f} {r.get('io_bound_ms', float('nan')):>11.1f} "
                     f"{r.get('ceiling_vs_naive', float('nan')):>9.2f}")
    out = Path(args.out_dir) / "results"
    write_results(out / f"{args.name}.json", records)
    atomic_write_text(out / f"{args.name}.txt", "\n".join(lines) + "\n")
    plot(records, ref, out, f"{spec.name}, {args.policy}, budget {policy.memory_budget} ({capacity} neurons/layer cached), "
                            f"trace {args.trace}", args.name)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

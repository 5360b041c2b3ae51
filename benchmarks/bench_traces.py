"""Traces and predictors on the small trained ReLU model (issue 8).

Loads models/small-relu-opt (training it first with real.train_small if the directory is missing),
records traces on the standard library's training text (for the predictor) and held-out text,
trains the low-rank predictor, scores it on the held-out trace, measures the perplexity of the
model whose FFNs compute only the predicted neurons, calibrates the synthetic generator to the
held-out trace and checks the OPT-6.7B paper preset. Writes benchmarks/results/traces.txt,
traces.png and traces.json, conf/trace/small-relu-opt.yaml, the
predictor (models/small-relu-opt/predictor-r<R>.safetensors) and the traces under cache/traces/.

    python benchmarks/bench_traces.py [--ranks 16 32 64] [--main-rank 32] [--train-tokens 32768]"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _results import write_results  # noqa: E402
from sim.atomic import atomic_write_text  # noqa: E402
from real.corpus import stdlib_bytes  # noqa: E402
from real.predictor import (language_model_scores, prediction_metrics, predicted_ffn,  # noqa: E402
                            random_predictor, train_predictor)
from real.record import load_model, record_trace, save_inputs, tokenize  # noqa: E402
from sim.model_spec import ModelSpec  # noqa: E402
from sim.presets import load_preset  # noqa: E402
from sim.trace import SyntheticTraceConfig, Trace, generate_trace  # noqa: E402
from sim.trace_fit import fit_trace, preset_yaml  # noqa: E402
from sim.trace_stats import WINDOWS, format_summary, summarize  # noqa: E402

MODEL_DIR = ROOT / "models" / "small-relu-opt"
CACHE = ROOT / "cache" / "traces"


def device_name() -> str:
    return f"cpu ({os.cpu_count()}-core {platform.machine()}, torch threads {__import__('torch').get_num_threads()})"


def texts(split: str, tokens: int, seq: int) -> list[np.ndarray]:
    seqs, _ = tokenize([stdlib_bytes(split, max_bytes=tokens + seq).decode("utf-8", "replace")], None, 256,
                       seq, "bytes", max_tokens=tokens)
    return [s for s in seqs if len(s) == seq]


def plot(path: Path, summary: dict, fit, pred_curve: list[tuple[float, float]], paper: dict,
         chosen: tuple[float, float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    L = summary["layers"]
    ax[0].bar(range(L), [100 * s for s in summary["sparsity"]], color="tab:blue")
    ax[0].set_xticks(range(L))
    ax[0].set(xlabel="layer", ylabel="sparsity (% of FFN neurons = 0)", title="small-relu-opt, held-out text",
              ylim=(min(100 * min(summary["sparsity"]) - 5, 90), 100))
    for l, s in enumerate(summary["sparsity"]):
        ax[0].text(l, 100 * s, f"{100 * s:.1f}", ha="center", va="bottom")
    k = summary["windows"]
    ax[1].plot(k, [100 * v for v in fit.recorded_curve], "o-", label="recorded (held-out)")
    ax[1].plot(k, [100 * v for v in fit.synthetic_curve], "s--", label="synthetic, calibrated")
    ax[1].plot(k, [100 * v for v in paper["curve"]], "^:", label="synthetic, OPT-6.7B paper preset")
    ax[1].set(xlabel="window k (tokens)", ylabel="new neurons read per token (% of d_ff)",
              title=f"reuse curve (calibrated max rel. err {100 * fit.max_rel_err:.1f}%)")
    ax[1].legend()
    reads, rec = zip(*pred_curve)
    ax[2].plot(reads, rec, "o-", label="threshold offset -3..+3")
    ax[2].plot(*chosen, "r*", ms=14, label="threshold for recall 0.95 on training text")
    ax[2].legend(loc="lower right")
    ax[2].axhline(0.9, color="grey", ls=":")
    ax[2].axvline(2.0, color="grey", ls=":")
    ax[2].set(xlabel="reads per token / oracle's", ylabel="recall (held-out)",
              title="low-rank predictor, threshold sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--main-rank", type=int, default=32)
    ap.add_argument("--write-preset", action="store_true", help="rewrite conf/trace/small-relu-opt.yaml from this run")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--heldout-tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000, help="predictor training steps per layer")
    a = ap.parse_args(argv)
    t0 = time.time()
    if not (MODEL_DIR / "config.json").exists():
        from real.train_small import main as train_main
        print(f"{MODEL_DIR} missing: training it (python -m real.train_small)")
        train_main(["--out", str(MODEL_DIR)])
    model = load_model(MODEL_DIR)
    train_meta = json.loads((MODEL_DIR / "training_meta.json").read_text())

    # 1. traces
    tr_seqs, ho_seqs = texts("train", a.train_tokens, a.seq), texts("heldout", a.heldout_tokens, a.seq)
    train_trace, train_in = record_trace(model, MODEL_DIR, tr_seqs, "bytes", True, "stdlib train split")
    held, held_in = record_trace(model, MODEL_DIR, ho_seqs, "bytes", True, "stdlib held-out split")
    CACHE.mkdir(parents=True, exist_ok=True)
    train_trace.save(CACHE / "small-relu-opt-train.npz")
    save_inputs(CACHE / "small-relu-opt-train.npz", train_in)
    summary = summarize(held)
    print(format_summary(summary))

    # 2. predictors
    rows, main_pred, main_metrics = [], None, None
    for r in a.ranks:
        ts = time.time()
        pred = train_predictor(train_in, train_trace.active, rank=r, target_recall=a.target_recall,
                               steps=a.steps, meta={"model": MODEL_DIR.name, "trace": "stdlib train split"})
        p = pred.predict_all(held_in)
        m = prediction_metrics(p, held.active)
        base = prediction_metrics(random_predictor(held.active, p.sum(axis=(0, 2)) / p.shape[0]), held.active)
        with predicted_ffn(model, pred):
            lm_pred = language_model_scores(model, ho_seqs)
        m.update(rank=r, random_recall=base["recall"], ppl_predicted=lm_pred["ppl"],
                 acc_predicted=lm_pred["accuracy"], train_s=time.time() - ts)
        rows.append(m)
        print(f"rank {r}: recall {m['recall']:.4f} precision {m['precision']:.4f} reads x{m['reads_vs_oracle']:.2f} "
              f"(random at equal reads: recall {base['recall']:.3f}); ppl {lm_pred['ppl']:.4f}")
        if r == a.main_rank:
            main_pred, main_metrics, main_p = pred, m, p
    assert main_pred is not None, "--main-rank must be one of --ranks"
    main_pred.save(MODEL_DIR / f"predictor-r{a.main_rank}.safetensors")
    Trace(active=held.active, predicted=main_p,
          meta=dict(held.meta, predictor=f"models/small-relu-opt/predictor-r{a.main_rank}.safetensors",
                    predictor_rank=a.main_rank)).save(CACHE / "small-relu-opt-heldout-predicted.npz")
    save_inputs(CACHE / "small-relu-opt-heldout-predicted.npz", held_in)
    lm_dense = language_model_scores(model, ho_seqs)

    # recall vs reads for the main predictor: sweep the threshold offset on held-out logits
    logits = np.stack([main_pred.logits(l, held_in[:, l]) for l in range(held.n_layers)], axis=1)
    sweep = []
    for off in np.linspace(-3, 3, 13):
        q = logits >= (main_pred.threshold[None, :, None] + off)
        mm = prediction_metrics(q, held.active)
        sweep.append((mm["reads_vs_oracle"], mm["recall"]))

    # 3. calibration to the held-out trace, and the small model's preset
    fit = fit_trace(held, tokens=100)
    fp = main_metrics["reads_vs_oracle"] - main_metrics["recall"]      # false positives per true active
    cfg = SyntheticTraceConfig(**{**fit.config.__dict__, "predictor_recall": round(main_metrics["recall"], 4),
                                  "predictor_fp": round(fp, 4)})
    header = (f"small-relu-opt (models/small-relu-opt), written by benchmarks/bench_traces.py on "
              f"{dt.date.today().isoformat()}.\nKnobs fitted by sim.trace_fit to a {held.tokens}-token held-out "
              f"trace: new-neurons curve over windows 1..8 within {100 * fit.max_rel_err:.1f}% (measured on a "
              f"regenerated trace).\npredictor_recall / predictor_fp: the rank-{a.main_rank} low-rank predictor "
              f"measured on the same text.")
    if a.write_preset:  # the committed preset changes only when asked
        atomic_write_text(ROOT / "conf" / "trace" / "small-relu-opt.yaml", preset_yaml(cfg, header))

    # 4. the OPT-6.7B paper preset, measured on a generated trace
    pp = load_preset("trace", "opt-6.7b-paper")
    pp.pop("kind", None)
    ptrace = generate_trace(ModelSpec.preset("opt-6.7b"), SyntheticTraceConfig.from_dict(pp))
    paper = {"sparsity": float(ptrace.sparsity().mean()), "curve": ptrace.new_neurons_curve(WINDOWS).tolist()}

    plot(ROOT / "benchmarks" / "results" / "traces.png", summary, fit, sweep, paper,
         (main_metrics["reads_vs_oracle"], main_metrics["recall"]))
    date = dt.date.today().isoformat()
    dev = device_name()
    m = main_metrics
    record = {"device": dev, "date": date, "model": "small-relu-opt", "mean_sparsity": summary["mean_sparsity"],
              "predictor_rank": a.main_rank, "recall": m["recall"], "precision": m["precision"], "fnr": m["fnr"],
              "reads_per_token": m["reads_per_token"], "oracle_reads_per_token": m["oracle_reads_per_token"],
              "reads_vs_oracle": m["reads_vs_oracle"], "random_recall_equal_reads": m["random_recall"],
              "ppl_dense": lm_dense["ppl"], "ppl_predicted": m["ppl_predicted"],
              "acc_dense": lm_dense["accuracy"], "acc_predicted": m["acc_predicted"],
              "synthetic_curve_max_rel_err": fit.max_rel_err, "heldout_tokens": held.tokens,
              "predictor_train_tokens": train_trace.tokens, "target_recall": a.target_recall,
              "model_train_steps": train_meta["steps"], "model_l1": train_meta["l1"]}
    extra = [{"device": dev, "date": date, "model": "small-relu-opt", "predictor_rank": r["rank"],
              "recall": r["recall"], "precision": r["precision"], "reads_vs_oracle": r["reads_vs_oracle"],
              "random_recall_equal_reads": r["random_recall"], "ppl_dense": lm_dense["ppl"],
              "ppl_predicted": r["ppl_predicted"], "kind": "rank_sweep"} for r in rows]
    paper_rec = {"device": dev, "date": date, "model": "opt-6.7b-paper (synthetic preset)",
                 "mean_sparsity": paper["sparsity"], "new_fraction_window5": paper["curve"][4], "kind": "paper_preset"}
    out = ROOT / "benchmarks" / "results" / "traces.json"
    write_results(out, [record] + extra + [paper_rec])

    L = held.n_layers
    lines = [f"# Traces and predictors: small-relu-opt ({L} layers, d_model {model.config.hidden_size}, "
             f"d_ff {held.d_ff}, byte vocab), {dev}, {date}",
             f"model: {train_meta['steps']} steps on the stdlib train split, l1={train_meta['l1']}, "
             f"{train_meta['train_seconds']} s of training; held-out: {held.tokens} tokens of unseen stdlib files",
             "", "## Held-out trace", format_summary(summary), "",
             f"## Low-rank predictor (trained on {train_trace.tokens} training-text tokens; threshold for recall "
             f"{a.target_recall} on its last 20%; scored on the held-out trace)",
             "rank  recall  precision  FNR     reads/token  oracle  reads/oracle  random recall  ppl_pred  acc_pred"]
    for r in rows:
        lines.append(f"{r['rank']:4d}  {r['recall']:.4f}  {r['precision']:.4f}     {r['fnr']:.4f}  "
                     f"{r['reads_per_token']:11.1f}  {r['oracle_reads_per_token']:6.1f}  {r['reads_vs_oracle']:12.2f}  "
                     f"{r['random_recall']:13.3f}  {r['ppl_predicted']:8.4f}  {r['acc_predicted']:.4f}")
    lines.append(f"rank {a.main_rank} per layer: recall " + " ".join(f"{v:.3f}" for v in m["recall_per_layer"])
                 + "; reads/oracle " + " ".join(f"{v:.2f}" for v in m["reads_vs_oracle_per_layer"]))
    lines += [f"dense model:  ppl {lm_dense['ppl']:.4f}  next-byte accuracy {lm_dense['accuracy']:.4f}",
              f"rank {a.main_rank}: ppl {lm_dense['ppl']:.4f} -> {m['ppl_predicted']:.4f} "
              f"({100 * (m['ppl_predicted'] / lm_dense['ppl'] - 1):+.2f}%), accuracy {lm_dense['accuracy']:.4f} -> "
              f"{m['acc_predicted']:.4f}", "",
              "## Synthetic calibration (sim.trace_fit) to the held-out trace",
              f"knobs: {json.dumps({k: v for k, v in fit.config.__dict__.items() if k not in ('tokens', 'seed')})}",
              "window k:        " + " ".join(f"{k:7d}" for k in WINDOWS),
              "recorded  (%)   " + " ".join(f"{100 * v:7.3f}" for v in fit.recorded_curve),
              "synthetic (%)   " + " ".join(f"{100 * v:7.3f}" for v in fit.synthetic_curve),
              f"max relative error over windows 1..8: {100 * fit.max_rel_err:.2f}%",
              f"best-partner Jaccard: recorded {fit.recorded_coactivation:.3f}, synthetic {fit.synthetic_coactivation:.3f}",
              "", "## OPT-6.7B paper preset (conf/trace/opt-6.7b-paper.yaml), generated for the opt-6.7b geometry",
              f"sparsity {paper['sparsity']:.4f} (paper ~0.97); new neurons per token at window 5: "
              f"{100 * paper['curve'][4]:.3f}% (paper ~2.4%)",
              "window k:        " + " ".join(f"{k:7d}" for k in WINDOWS),
              "new (%)         " + " ".join(f"{100 * v:7.3f}" for v in paper["curve"]), "",
              f"total {time.time() - t0:.0f} s"]
    atomic_write_text(out.with_suffix(".txt"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

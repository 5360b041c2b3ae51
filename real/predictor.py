"""Low-rank activation predictor per layer (LLM in a Flash, Sec. 3.1; Deja Vu).

For FFN input x (what ``fc1`` / ``gate_proj`` sees), layer l predicts the neurons that will fire as
``sigmoid((x @ A_l) @ B_l + b_l) >= sigmoid(t_l)``, with A_l [d_model, r], B_l [r, d_ff]. It is trained
on a recorded trace and its FFN inputs (``real.record --save-inputs``) with a balanced binary
cross-entropy (positives weighted by #inactive/#active, so the rare active class counts as much as
the common inactive one). The threshold t_l is then set on a calibration slice so that a target
share of the truly active neurons is caught (recall): a false negative costs accuracy, a false
positive only costs a read.

    python -m real.predictor train --trace TRAIN.npz --out PRED.safetensors [--rank 32] [--target-recall 0.95]
    python -m real.predictor apply --predictor PRED.safetensors --trace TEST.npz --out TEST_pred.npz

``apply`` writes the trace with its ``predicted`` array filled, which the simulator and engine use
with ``policy.predictor=trace``. Inference (``LowRankPredictor``) is plain numpy; training uses torch.

Look-ahead predictors (``real.lookahead``: layer l's set from layer l-1's input, for ``policy.lookahead=1``):

    python -m real.predictor train --lookahead --trace TRAIN.npz --out LA.safetensors
    python -m real.predictor apply --predictor PRED.safetensors --lookahead-predictor LA.safetensors --trace TEST.npz --out O.npz

``apply`` then also fills the trace's ``lookahead`` sets (sim.trace.Trace.lookahead)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sim.atomic import atomic_path
from sim.errors import require
from sim.trace import Trace


@dataclass
class LowRankPredictor:
    A: list[np.ndarray]            # per layer [d_model, r]
    B: list[np.ndarray]            # per layer [r, d_ff]
    bias: list[np.ndarray]         # per layer [d_ff]
    threshold: np.ndarray          # per layer, on the logit
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.A)

    @property
    def rank(self) -> int:
        return self.A[0].shape[1]

    def logits(self, layer: int, x: np.ndarray) -> np.ndarray:
        return (x @ self.A[layer]) @ self.B[layer] + self.bias[layer]

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.logits(layer, x) >= self.threshold[layer]

    def predict_all(self, inputs: np.ndarray) -> np.ndarray:
        """bool [tokens, layers, d_ff] from FFN inputs [tokens, layers, d_model]."""
        require(inputs.shape[1] == self.n_layers, "predictor", f"has {self.n_layers} layers but the inputs "
                f"have {inputs.shape[1]}", "use a predictor trained for this model")
        return np.stack([self.predict(l, inputs[:, l]) for l in range(self.n_layers)], axis=1)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"threshold": self.threshold.astype(np.float32)}
        for l in range(self.n_layers):
            tensors[f"layer.{l}.A"] = self.A[l].astype(np.float32)
            tensors[f"layer.{l}.B"] = self.B[l].astype(np.float32)
            tensors[f"layer.{l}.bias"] = self.bias[l].astype(np.float32)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LowRankPredictor":
        from safetensors import safe_open
        path = Path(path)
        require(path.exists(), "predictor", f"{path} does not exist",
                "train one with python -m real.predictor train")
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            t = {k: f.get_tensor(k) for k in f.keys()}
        n = len(t["threshold"])
        return cls(A=[t[f"layer.{l}.A"] for l in range(n)], B=[t[f"layer.{l}.B"] for l in range(n)],
                   bias=[t[f"layer.{l}.bias"] for l in range(n)], threshold=t["threshold"], meta=meta)


# ---- training --------------------------------------------------------------------------------
def train_layer(x: np.ndarray, y: np.ndarray, rank: int, steps: int = 2000, lr: float = 3e-3,
                batch: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, bias) for one layer from inputs x [N, d_model] and masks y bool [N, d_ff]."""
    import torch
    g = torch.Generator().manual_seed(seed)
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    Y = torch.from_numpy(y.astype(np.float32))
    N, d = X.shape
    F = Y.shape[1]
    p = float(Y.mean().clamp(1e-4, 1 - 1e-4))
    mu, sd = X.mean(0), X.std(0) + 1e-6     # standardize inside training; folded into A and bias after
    A = torch.nn.Parameter(torch.randn(d, rank, generator=g) / d ** 0.5)
    B = torch.nn.Parameter(torch.randn(rank, F, generator=g) / rank ** 0.5 * 0.1)
    b = torch.nn.Parameter(torch.full((F,), float(np.log(p / (1 - p)))))
    opt = torch.optim.Adam([A, B, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - p) / p))   # balanced classes
    for _ in range(steps):
        idx = torch.randint(0, N, (min(batch, N),), generator=g)
        loss = loss_fn((((X[idx] - mu) / sd) @ A) @ B + b, Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        A_f = A / sd[:, None]                  # (x - mu)/sd @ A = x @ (A/sd) - (mu/sd) @ A
        bias_f = b - ((mu / sd) @ A) @ B
    return A_f.numpy(), B.detach().numpy(), bias_f.numpy()


def recall_threshold(logits: np.ndarray, active: np.ndarray, target_recall: float) -> float:
    """The largest logit threshold that catches ``target_recall`` of the active neurons."""
    pos = logits[active]
    if pos.size == 0:
        return float("inf")
    return float(np.quantile(pos, 1.0 - target_recall, method="lower"))


def train_predictor(inputs: np.ndarray, active: np.ndarray, rank: int = 32, target_recall: float = 0.95,
                    calib_fraction: float = 0.2, steps: int = 2000, seed: int = 0,
                    meta: dict | None = None) -> LowRankPredictor:
    """Train on the first (1 - calib_fraction) of the tokens, set thresholds on the rest."""
    T, L, d = inputs.shape
    require(active.shape[:2] == (T, L), "trace", f"masks {active.shape} and inputs {inputs.shape} disagree",
            "use the inputs saved with the same recording")
    require(1 <= rank, "rank", f"must be >= 1, got {rank}", "e.g. --rank 32")
    require(0 < target_recall <= 1, "target_recall", f"must be in (0, 1], got {target_recall}", "e.g. 0.95")
    cut = int(T * (1 - calib_fraction))
    As, Bs, bs, th = [], [], [], []
    for l in range(L):
        A, B, b = train_layer(inputs[:cut, l], active[:cut, l], rank, steps=steps, seed=seed + l)
        logit = (inputs[cut:, l] @ A) @ B + b
        As.append(A), Bs.append(B), bs.append(b)
        th.append(recall_threshold(logit, active[cut:, l], target_recall))
    m = dict(meta or {}, rank=rank, target_recall=target_recall, train_tokens=cut, calib_tokens=T - cut,
             steps=steps, seed=seed, loss="BCE with pos_weight = #inactive/#active per layer")
    return LowRankPredictor(As, Bs, bs, np.asarray(th, dtype=np.float32), m)


# ---- scoring ---------------------------------------------------------------------------------
def prediction_metrics(predicted: np.ndarray, active: np.ndarray) -> dict[str, Any]:
    """Recall, precision, false-negative rate and reads per token, per layer and over all layers."""
    tp = (predicted & active).sum(axis=(0, 2)).astype(float)
    pred = predicted.sum(axis=(0, 2)).astype(float)
    act = active.sum(axis=(0, 2)).astype(float)
    T = active.shape[0]
    recall = tp.sum() / max(act.sum(), 1)
    return {"recall": float(recall), "precision": float(tp.sum() / max(pred.sum(), 1)), "fnr": float(1 - recall),
            "reads_per_token": float(pred.sum() / T), "oracle_reads_per_token": float(act.sum() / T),
            "reads_vs_oracle": float(pred.sum() / max(act.sum(), 1)),
            "recall_per_layer": (tp / np.maximum(act, 1)).tolist(),
            "precision_per_layer": (tp / np.maximum(pred, 1)).tolist(),
            "reads_vs_oracle_per_layer": (pred / np.maximum(act, 1)).tolist()}


def random_predictor(active: np.ndarray, reads_per_token_layer: np.ndarray, seed: int = 0) -> np.ndarray:
    """A baseline with the same number of reads per token and layer, neurons chosen uniformly."""
    rng = np.random.default_rng(seed)
    T, L, F = active.shape
    out = np.zeros_like(active)
    for l in range(L):
        k = int(round(reads_per_token_layer[l]))
        idx = np.argsort(rng.random((T, F)), axis=1)[:, :k]
        np.put_along_axis(out[:, l], idx, True, axis=1)
    return out


# ---- the predictor inside the model: FFN restricted to predicted neurons ----------------------
@contextlib.contextmanager
def predicted_ffn(model, predictor: LowRankPredictor) -> Iterator[dict[str, float]]:
    """While active, each layer's FFN computes only the predicted neurons (the others are zeroed
    before the ReLU, so they contribute exactly nothing), as the flash backend would. Yields
    counters: neurons kept and tokens seen."""
    import torch
    from real.record import ffn_up_modules
    mods = ffn_up_modules(model)
    require(len(mods) == predictor.n_layers, "predictor", f"has {predictor.n_layers} layers, the model "
            f"{len(mods)}", "use a predictor trained on this model's trace")
    stats = {"kept": 0.0, "tokens": 0.0}
    params = [tuple(torch.from_numpy(np.asarray(a)) for a in (predictor.A[l], predictor.B[l], predictor.bias[l]))
              for l in range(len(mods))]

    def hook_for(l: int):
        A, B, b = params[l]
        thr = float(predictor.threshold[l])

        def hook(module, args, out):
            x = args[0].to(A.dtype)
            keep = ((x @ A) @ B + b) >= thr
            stats["kept"] += float(keep.sum())
            stats["tokens"] += keep.numel() / keep.shape[-1]
            return out * keep.to(out.dtype)
        return hook

    with ffn_hooks(mods, hook_for):
        yield stats


@contextlib.contextmanager
def ffn_hooks(mods, hook_for) -> Iterator[None]:
    """Forward hooks ``hook_for(l)`` on the modules ``mods[l]`` while the block runs (removed after, even on errors)."""
    handles = [m.register_forward_hook(hook_for(l)) for l, m in enumerate(mods)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def language_model_scores(model, seqs: Sequence[np.ndarray], batch: int = 8) -> dict[str, float]:
    """Teacher-forced next-token perplexity and accuracy over ``seqs``."""
    import torch
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        i = 0
        while i < len(seqs):
            j = i + 1
            while j < len(seqs) and j - i < batch and len(seqs[j]) == len(seqs[i]):
                j += 1
            ids = torch.from_numpy(np.stack(seqs[i:j]))
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           target.reshape(-1), reduction="sum"))
            hits += int((logits.argmax(-1) == target).sum())
            n += target.numel()
            i = j
    return {"ppl": float(np.exp(nll / n)), "accuracy": hits / n, "nll": nll / n, "tokens": n}


# ---- CLI -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from real.record import load_inputs
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a predictor on a trace recorded with --save-inputs")
    t.add_argument("--trace", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--rank", type=int, default=32)
    t.add_argument("--target-recall", type=float, default=0.95)
    t.add_argument("--steps", type=int, default=2000, help="Adam steps per layer (batches of 512 tokens)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lookahead", action="store_true",
                   help="train a look-ahead predictor (layer l's set from layer l-1's input; real.lookahead)")
    p = sub.add_parser("apply", help="fill a trace's predicted array and score it")
    p.add_argument("--predictor", type=Path, required=True)
    p.add_argument("--lookahead-predictor", type=Path, default=None,
                   help="also fill the trace's look-ahead sets with this look-ahead predictor")
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    trace = Trace.load(a.trace)
    inputs = load_inputs(a.trace)
    if a.cmd == "train":
        from real.lookahead import train_lookahead
        meta = {"model": trace.meta.get("model", ""), "trace": str(a.trace)}
        pred = (train_lookahead if a.lookahead else train_predictor)(inputs, trace.active, a.rank, a.target_recall,
                                                                    steps=a.steps, seed=a.seed, meta=meta)
        pred.save(a.out)
        print(f"wrote {a.out} ({'look-ahead, ' if a.lookahead else ''}rank {pred.rank}, "
              f"thresholds {np.round(pred.threshold, 3).tolist()})")
        return 0
    pred = LowRankPredictor.load(a.predictor)
    predicted = pred.predict_all(inputs)
    meta = dict(trace.meta, predictor=str(a.predictor), predictor_rank=pred.rank)
    lookahead = None
    if a.lookahead_predictor is not None:
        from real.lookahead import predict_lookahead
        lookahead = predict_lookahead(LowRankPredictor.load(a.lookahead_predictor), inputs)
        meta["lookahead_predictor"] = str(a.lookahead_predictor)
    Trace(active=trace.active, predicted=predicted, meta=meta, lookahead=lookahead).save(a.out)
    m = prediction_metrics(predicted, trace.active)
    print(f"wrote {a.out}: recall {m['recall']:.4f} precision {m['precision']:.4f} "
          f"reads/token {m['reads_per_token']:.1f} (oracle {m['oracle_reads_per_token']:.1f}, "
          f"x{m['reads_vs_oracle']:.2f})")
    if lookahead is not None:
        from sim.trace_stats import lookahead_shares
        s = lookahead_shares(predicted, lookahead)
        print(f"look-ahead (layers 1..): recall of the predicted sets {s['recall']:.4f}, of their new neurons "
              f"{s['new_recall']:.4f}; extras {s['fp']:.3f} per predicted neuron, precision {s['precision']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The neuron cache of one FFN layer: rows of bundled neurons ([gate,] up column, down row) that stay
in memory between tokens, managed exactly as the policy engine's ``LayerPlan`` says.

Two strategies, named like ``policy.mem_strategy``:

- ``preallocated`` (the paper's scheme): one matrix [capacity, width] allocated once. Evicted rows
  are filled by moving the last surviving rows into the gaps (``plan.moves``, src rows all lie
  above the new end and dst rows below it, so one gather/scatter does them all); new neurons are
  written at the end (``plan.insert_rows``). Nothing is reallocated per token.
- ``concat`` (baseline): the matrix holds exactly the resident rows and is rebuilt every token by
  ``torch.cat`` of the kept rows and the new ones (the allocate-and-copy a naive cache would do).

The index bookkeeping (``row_of``, ``neuron_at``) mirrors ``sim.plan.LayerCacheState``; ``check``
compares the two. The time spent here is the run's ``mem_ms``; callers time ``apply``."""

from __future__ import annotations

import numpy as np
import torch

from sim.plan import LayerCacheState, LayerPlan

STRATEGIES = ("preallocated", "concat")


class NeuronCache:
    def __init__(self, d_ff: int, capacity: int, width: int, dtype: torch.dtype, device: torch.device | str,
                 strategy: str = "preallocated", upload=None):
        if strategy not in STRATEGIES:
            raise ValueError(f"policy.mem_strategy: unknown strategy {strategy!r}; use one of {STRATEGIES}")
        self.d_ff, self.capacity, self.width, self.strategy = d_ff, capacity, width, strategy
        self.device = torch.device(device)
        # host index arrays -> device tensors; the engine passes one that copies from pinned memory
        # without a host sync (``real.engine.IndexUpload``); the default blocks until the device is idle
        self.upload = upload or (lambda *arrays: [torch.from_numpy(a).to(self.device) for a in arrays])
        rows = capacity if strategy == "preallocated" else 0
        self.data = torch.zeros((rows, width), dtype=dtype, device=self.device)
        self.bias = torch.zeros(rows, dtype=dtype, device=self.device)   # up-projection bias, row-aligned
        self.row_of = np.full(d_ff, -1, dtype=np.int64)
        self.neuron_at = np.full(max(capacity, 1), -1, dtype=np.int64)
        self.n_rows = 0
        self.rows_copied = 0      # total rows moved or copied by memory management so far
        self._keep = None

    @property
    def nbytes(self) -> int:
        """Bytes this cache holds in memory (its preallocated size for the paper's scheme)."""
        return self.capacity * self.width * self.data.element_size()

    def rows_for(self, neurons: np.ndarray) -> np.ndarray:
        """Cache rows of resident ``neurons``; raises if one is not resident (a plan/cache mismatch)."""
        rows = self.row_of[neurons]
        if rows.size and rows.min() < 0:
            missing = neurons[rows < 0][:5]
            raise RuntimeError(f"neurons {missing.tolist()} are not resident: the neuron cache and the plan disagree")
        return rows

    def view(self) -> torch.Tensor:
        """The resident rows [n_rows, width]."""
        return self.data[: self.n_rows]

    def apply(self, plan: LayerPlan, new_rows: torch.Tensor | None, new_bias: torch.Tensor | None = None) -> None:
        """Execute the plan's memory management: evict, move, insert (``evict`` then ``insert``)."""
        self.evict(plan)
        self.insert(plan, new_rows, new_bias)

    def evict(self, plan: LayerPlan) -> None:
        """Drop ``plan.evict`` and fill the holes with ``plan.moves``. Needs none of the new rows,
        so the engine may run it while the plan's reads are in flight (after the FFN over the
        resident neurons has read the cache: same device stream)."""
        evict = plan.evict
        gaps = np.sort(self.row_of[evict]) if evict.size else np.zeros(0, np.int64)
        if gaps.size and gaps.min() < 0:
            raise RuntimeError(f"layer {plan.layer} token {plan.token}: the plan evicts neurons that are not resident")
        n = self.n_rows
        m = n - gaps.size
        self.row_of[evict] = -1
        self.neuron_at[gaps] = -1
        if self.strategy == "preallocated":
            mv = plan.moves
            if mv.size:
                src, dst = mv[:, 0], mv[:, 1]
                if not (src.min() >= m and dst.max() < m):
                    raise RuntimeError(f"layer {plan.layer}: moves must go from rows >= {m} to rows < {m}")
                s, d = self.upload(src, dst)
                self.data.index_copy_(0, d, self.data.index_select(0, s))
                self.bias.index_copy_(0, d, self.bias.index_select(0, s))
                moved = self.neuron_at[src].copy()
                self.neuron_at[src] = -1
                self.neuron_at[dst] = moved
                self.row_of[moved] = dst
                self.rows_copied += int(src.size)
            self._keep = None
        else:  # concat: remember the kept rows in order; insert() rebuilds the matrix
            keep = np.flatnonzero(self.neuron_at[:n] >= 0)
            kept_neurons = self.neuron_at[keep]
            self._keep, = self.upload(keep)
            self.rows_copied += int(keep.size)
            self.neuron_at[:] = -1
            self.neuron_at[: keep.size] = kept_neurons
            self.row_of[kept_neurons] = np.arange(keep.size)
        self.n_rows = m

    def insert(self, plan: LayerPlan, new_rows: torch.Tensor | None, new_bias: torch.Tensor | None = None,
               keep_sel: torch.Tensor | None = None) -> None:
        """Write the loaded neurons with ``insert_rows >= 0`` at the end (after ``evict``).

        ``new_rows`` [len(plan.load), width] are the loaded neurons in ``plan.load`` order (on the
        cache's device); ``new_bias`` [len(plan.load)] their up-projection bias, kept row-aligned
        so kernels index both alike. ``keep_sel``: optional device tensor of the positions in
        ``plan.load`` with ``insert_rows >= 0`` (uploaded here when some loaded neurons are transient
        and it is not given; the engine uploads it early, while the reads are in flight)."""
        insert_mask = plan.insert_rows >= 0
        ins_rows = plan.insert_rows[insert_mask]
        ins_neurons = plan.load[insert_mask]
        m, k = self.n_rows, ins_rows.size
        if k and (ins_rows[0] != m or ins_rows[-1] != m + k - 1):
            raise RuntimeError(f"layer {plan.layer}: inserts must fill rows {m}.. in order")
        if k:
            if k == insert_mask.size:
                pick = lambda t: t                                              # noqa: E731
            else:
                sel = keep_sel if keep_sel is not None else self.upload(np.flatnonzero(insert_mask))[0]
                if sel.numel() != k:
                    raise RuntimeError(f"layer {plan.layer}: keep_sel has {sel.numel()} rows, the plan keeps {k}")
                pick = lambda t: t.index_select(0, sel)                         # noqa: E731
        if self.strategy == "preallocated":
            if k:
                self.data.narrow(0, m, k).copy_(pick(new_rows))
                if new_bias is not None:
                    self.bias.narrow(0, m, k).copy_(pick(new_bias))
        else:
            keep = self._keep
            parts, bparts = [self.data.index_select(0, keep)], [self.bias.index_select(0, keep)]
            if k:
                parts.append(pick(new_rows))
                bparts.append(pick(new_bias) if new_bias is not None else
                              torch.zeros(k, dtype=self.bias.dtype, device=self.device))
            self.data = torch.cat(parts)
            self.bias = torch.cat(bparts)
        self.neuron_at[m: m + k] = ins_neurons
        self.row_of[ins_neurons] = np.arange(m, m + k)
        self.n_rows = m + k
        if self.n_rows != plan.resident:
            raise RuntimeError(f"layer {plan.layer} token {plan.token}: cache holds {self.n_rows} rows, "
                               f"plan says {plan.resident}")

    def check(self, state: LayerCacheState) -> None:
        """Assert that this cache's bookkeeping equals the policy engine's (debug and tests)."""
        if self.n_rows != state.n_rows:
            raise AssertionError(f"n_rows {self.n_rows} != policy engine's {state.n_rows}")
        if not np.array_equal(self.row_of, state.row_of):
            bad = np.flatnonzero(self.row_of != state.row_of)[:5]
            raise AssertionError(f"row_of differs from the policy engine's at neurons {bad.tolist()}")
        if not np.array_equal(self.neuron_at[: self.n_rows], state.neuron_at[: self.n_rows]):
            raise AssertionError("neuron_at differs from the policy engine's")

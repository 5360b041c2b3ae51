# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Simulator vs measurement
#
# Loads the results of a `backend=both` sweep (e.g. `+experiment=validation`), shows the
# prediction error per run and per knob, then calibrates the simulator's free timing constants on
# half of the points and shows the error on the other half, before and after.
# `FLASHLAB_RESULTS=sweep_dir_or_results.csv` (comma-separated for several);
# `FLASHLAB_BASE_HARDWARE` names the profile to start the fit from (default: the runs' own).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
try:
    from IPython.display import display
except ImportError:  # run as a plain script
    display = print

from experiments import plots
from experiments.calibrate_sim import fit, format_report, load_points, pairs_table
from experiments.figures import load_results
from sim.hardware import HardwareProfile

paths = [p for p in os.environ.get("FLASHLAB_RESULTS", "benchmarks/validation").split(",") if p]
df = load_results(paths)
pairs = plots.prediction_pairs(df)
print(f"{len(pairs)} backend=both runs from {paths}")

# %% [markdown]
# ## Error of the uncalibrated simulator

# %%
cols = ["policy", "window", "chunk_kib", "memory_budget", "sparsity", "predicted_ms", "measured_ms", "error_pct"]
print(pairs[cols].sort_values("error_pct").to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
a = pairs["error_pct"].abs()
print(f"\nmedian |error| {np.median(a):.1f}%, max {a.max():.1f}%")

# %%
fig = plots.predicted_vs_measured(pairs, title="Before calibration: all points")
display(fig)
plt.close(fig)

# %% [markdown]
# ## Which knob does the error follow?

# %%
for knob in ["policy", "window", "chunk_kib", "memory_budget", "sparsity"]:
    if pairs[knob].nunique() > 1:
        print(pairs.groupby(knob)["error_pct"].agg(["mean", "median", "min", "max"]).round(1), "\n")

# %% [markdown]
# ## Calibrate on half, judge on the other half

# %%
points = load_points(paths)
base_name = os.environ.get("FLASHLAB_BASE_HARDWARE") or df[df["backend"] == "real"]["hardware"].iloc[0]
cal = fit(points, HardwareProfile.preset(base_name), seed=0, max_evals=int(os.environ.get("FLASHLAB_MAX_EVALS", 300)))
print(format_report(cal.report))

# %%
fig = plots.predicted_vs_measured(pairs_table(points, cal), title="Held-out points: before and after calibration")
display(fig)
plt.close(fig)

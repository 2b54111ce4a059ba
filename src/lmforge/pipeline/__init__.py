"""The data stage's datatrove blocks: readers, normalise/filters/PII, dedup, tokenizer training, publish, report."""

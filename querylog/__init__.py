"""The query-log library: readers, cleaning, near-duplicates, labels and the generator; plain functions on DataFrames, no orchestration."""

"""Data quality: the quarantine writer now; Great Expectations gates per stage later."""

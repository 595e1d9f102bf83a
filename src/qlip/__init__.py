"""qlip: QLIP visual tokenizer (public API is re-exported here)."""

"""The TOML configuration: files in, frozen settings out, every mistake one sentence."""

"""Configuration files shipped with trelm_fast (`default.yaml`: the embedded default run)."""

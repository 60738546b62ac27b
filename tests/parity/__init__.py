"""Cross-framework parity: one policy decides the same in Equinox, Linen and NNX."""

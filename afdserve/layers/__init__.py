"""Single-device math of one MoE layer: norm, rotary, paged attention, router, experts.

Shape legend used throughout: T tokens, D hidden, H query heads, G kv heads, Hd head dim,
E experts, K top-k, F fused gate+up width (2 * I), I expert intermediate, V vocab,
NB KV blocks, BS block size.
"""

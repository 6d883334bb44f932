"""Maths and runtime pieces shared by patchers, training and evaluation: the one NLL (`nll`), RoPE frequency
formulas (`rope`), the LongRoPE factor search (`rope_search`), S2-Attn for long finetunes, and activation capture
for the patches computed from calibration data (`activations`).
"""

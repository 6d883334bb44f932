"""Training a patched model: short finetunes on accelerate (`finetune`) and LoRA through peft (`lora`).

LoRA lives here and not in `patchers/`: an adapter is trained, not computed from the weights.
"""

"""Adapter types (LoRA, DoRA, LoKr, LoHa): their math, and their tensors in the keys ComfyUI loads."""

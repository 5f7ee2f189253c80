"""Adapter networks: LoRA, DoRA, LoKr and LoHa layers (``layers``), the network that attaches them to a
model (``network``), their file format with the keys every runtime loads (``files``) and the check of a
file's keys against a model (``verify``)."""

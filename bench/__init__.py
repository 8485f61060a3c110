"""Training-speed benchmark: LoReFT (loreft.trainer's compiled step) vs mlx-lm LoRA vs pyreft.

`python -m bench` (see bench/__main__.py). Nothing here imports MLX at package import: the workers pick
their BLAS before mlx.core loads, and the pyreft worker runs in a venv without MLX.
"""

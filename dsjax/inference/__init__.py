"""Inference on the model's one forward pass: generation over the latent cache (`generate`) and the
DeepSeek-V3.1 chat template (`chat`)."""

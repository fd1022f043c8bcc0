"""Inference on the model's one forward pass: generation over the latent cache (`generate`), the
DeepSeek-V3.1 chat template (`chat`) and RL rollouts behind a small engine interface (`rollout`)."""

"""Training: optimizer (`optim`), checkpoints (`checkpoint`), losses (`losses`), logging
(`metrics`) and the shared loop (`loop.train`). Submodules are imported on demand."""

"""Launchers: one host (`local`), Cloud TPU VM slices (`tpu_vm`), SLURM GPU clusters (`slurm`)."""

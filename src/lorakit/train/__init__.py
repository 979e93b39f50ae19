"""Training: data, loop, checkpoints, diagnostics and plots for `lorakit train`."""

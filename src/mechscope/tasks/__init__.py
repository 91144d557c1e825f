"""Ground-truth tasks: one file per task with its data, causal model (where it has one),
model recipe and success criteria. Imported lazily by the bench and the CLI."""

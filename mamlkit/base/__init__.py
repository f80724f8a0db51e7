"""Base: the types every part shares (TaskBatch, task seeds, UserError, metrics and logs). Imports nothing
of the rest of mamlkit."""

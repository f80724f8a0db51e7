"""Engine: pure math on parameter dicts. ``functional`` runs a plain module with a dict of tensors,
``inner`` is the one inner loop (``adapt_path``) and its objectives, ``rules`` the inner update rules,
``norms`` the batch-norm modes, ``outputs`` the tensor of a model's output that the loss takes. It knows
nothing of how tasks are batched, of data sets or of algorithms."""

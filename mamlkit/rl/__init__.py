"""Meta-reinforcement learning: MAML-TRPO (Finn et al. 2017, §5.3 and App. A.2) on the mamlkit engine.

Layout:

* ``envs.py``: vectorised ``[T tasks, N trajectories]`` environments with a Gymnasium-like API;
  ``Nav2D`` (pure torch) and ``cheetah.py`` (HalfCheetah velocity/direction on gymnasium + mujoco,
  the optional ``rl`` extra). Tasks come from ``sample_tasks(env, T, generator)``.
* ``metaworld.py``: Meta-World's ML1 and ML10 (the optional ``metaworld`` extra), train split only in
  training; ``metaworld_eval.py``: its official ``metalearning_evaluation`` with the policy as its agent.
* ``policy.py``: the Gaussian MLP policy (a plain ``nn.Module``), log-likelihood, KL.
* ``sampling.py``: rollouts and packing episodes as the engine's per-task ``(x, y)``.
* ``advantages.py``: discounted returns, the linear feature baseline, GAE.
* ``trpo.py``: conjugate gradient, Fisher-vector products (Hessian-vector products of the KL),
  the TRPO step with its backtracking line search.
* ``maml_trpo.py``: the meta-learner: inner step = :func:`mamlkit.engine.inner.adapt_path`, outer = TRPO,
  whose gradient and Fisher products come task by task through the inner step (``linearize_tasks``).
* ``families.py``: the environment families (nav2d, cheetah-vel, cheetah-dir, Meta-World): what each
  environment needs (its environments, tasks, defaults, report, options), looked up by ``family_of(env)``;
  ``options.py``: the help groups of ``mamlkit rl train`` and TRPO's options.
* ``config.py``, ``train.py``, ``evaluate.py``, ``cli.py``: ``mamlkit rl train|eval|adapt``;
  ``adapt_inputs.py``: nav2d's arena of goals and the shipped policies (no torch: the parser's help reads it).
"""

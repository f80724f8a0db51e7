"""Presets: named after the paper setting they reproduce, with the citation.

Each preset is a set of overrides of :class:`~mamlkit.config.TrainConfig` defaults.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mamlkit.config import ConfigError, TrainConfig, from_dict


@dataclass(frozen=True)
class Preset:
    name: str
    overrides: dict[str, Any]
    citation: str
    summary: str
    paper: dict[str, Any]  # the paper's printed numbers, shown beside ours in reports


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


# The paper's protocol (Finn et al. 2017, §5.1; the authors' code, github.com/cbfinn/maml, main.py):
# one model, meta-trained with K=10 (the usage line "10-shot sinusoid": --update_batch_size=10), one
# inner step, meta-batch 25, Adam 1e-3, 70,000 iterations. At test time that single model is fine-tuned on
# K=5, 10 and 20 points ("we fine-tune a single meta-learned model on varying numbers of K examples"):
# main.py's test() draws 600 tasks (NUM_TEST_POINTS), each with K support and K query points
# (DataGenerator(update_batch_size*2) split in half), takes 10 steps (test_num_updates=10 with
# --train=False) at the same α (update_lr), every step on the same K points, and reports mean and
# 1.96·σ/√600. eval_query=0 scores K query points, as that code.
# α: §5.1 says 0.01; the code's usage line sets no --update_lr, so it trains and tests at the flag's
# default, 1e-3. We follow the code: at α=1e-3 plain SGD on our models gives the paper's Figure 3 (K=5:
# 0.53-0.69 / 0.26-0.37 / 0.24-0.33 after 1/5/10 steps over three seeds, against 0.67 / 0.38 / 0.35),
# while at α=0.01 the meta-learned model is too sharp for 5 points (0.49 after 5 steps, 0.41 after 10,
# non-finite on some seeds): see benchmarks/RESULTS.md. `--inner-lr 0.01` gives the §5.1 setting.
# The pretrained baseline is fine-tuned "with a tuned step size" (Fig. 2): the best of baseline_lrs on the
# validation tasks.
register_preset(Preset(
    name="sinusoid",
    overrides=dict(task="sinusoid", algo="maml", loss="mse", model="mlp", hidden_sizes=(40, 40), k_shot=10,
                   k_query=10, inner_lr=0.001, inner_steps=1, test_inner_steps=10, meta_batch=25, meta_lr=1e-3,
                   iterations=70_000, eval_steps=(0, 1, 5, 10), eval_shots=(5, 10, 20), eval_query=0,
                   eval_tasks=600, baseline_lrs=(0.001, 0.003, 0.01, 0.03, 0.1)),
    citation="Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017, §5.1 and Fig. 2-3; α and the "
             "evaluation as the authors' code (cbfinn/maml main.py: update_lr default, test())",
    summary="sinusoid regression, MLP 1-40-40-1, one model meta-trained with K=10, α=0.001 (the authors' code; "
            "§5.1 says 0.01), 1 step, meta-batch 25, Adam 1e-3, 70k its; then fine-tuned on K=5/10/20: 600 "
            "tasks, K query points each, 10 steps of plain SGD at α on the same K points (--test-guard: a step "
            "that would raise the support loss is halved); the pretrained baseline at its best step size on "
            "validation tasks",
    # Read off the paper's Figure 3 (5-shot, after 1/5/10 gradient steps).
    paper={"maml": {5: {1: 0.67, 5: 0.38, 10: 0.35}}, "pretrain": {5: {1: 2.41, 5: 2.23, 10: 2.19}}},
))


# Few-shot classification (Finn et al. 2017, §5.2, Appendix A.1; Table 1 numbers: MAML, ± 95% CI).
_MAML_CITATION = ("Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017, §5.2, Appendix A.1 and "
                  "Table 1")
_FEW_SHOT = dict(algo="maml", loss="cross_entropy", model="conv4", meta_lr=1e-3, iterations=60_000,
                 compare_pretrained=False, bn_mode="transductive", eval_tasks=600)
# Omniglot: 64 filters, stride-2 convolutions on 28x28, rotations as new classes. The original code draws
# K query images per class (update_batch_size * 2 samples per class), so k_query = k_shot.
_OMNIGLOT = dict(_FEW_SHOT, task="omniglot", filters=64, pool=False, image_size=28, split="paper",
                 rotations="per_task")
for _ways, _shots, _paper in ((5, 1, "98.7 ± 0.4"), (5, 5, "99.9 ± 0.1"), (20, 1, "95.8 ± 0.3"),
                              (20, 5, "98.9 ± 0.2")):
    _steps = dict(inner_lr=0.4, inner_steps=1, test_inner_steps=3, meta_batch=32) if _ways == 5 else \
        dict(inner_lr=0.1, inner_steps=5, test_inner_steps=5, meta_batch=16)
    register_preset(Preset(
        name=f"omniglot-{_ways}w{_shots}s",
        overrides=dict(_OMNIGLOT, n_way=_ways, k_shot=_shots, k_query=_shots, **_steps),
        citation=_MAML_CITATION,
        summary=(f"Omniglot {_ways}-way {_shots}-shot, Conv4 (64 filters, stride 2), α={_steps['inner_lr']}, "
                 f"{_steps['inner_steps']} step(s) train / {_steps['test_inner_steps']} test, meta-batch "
                 f"{_steps['meta_batch']}, Adam 1e-3, 60k its, 1100/100/423-character split, rotations"),
        paper={"maml": _paper},
    ))

# mini-ImageNet (Ravi & Larochelle split): 32 filters, 2x2 max-pool, 84x84, 15 query images per class.
for _shots, _batch, _paper, _fo in ((1, 4, "48.70 ± 1.84", "48.07 ± 1.75"),
                                    (5, 2, "63.11 ± 0.92", "63.15 ± 0.91")):
    register_preset(Preset(
        name=f"miniimagenet-5w{_shots}s",
        overrides=dict(_FEW_SHOT, task="miniimagenet", filters=32, pool=True, image_size=84, n_way=5,
                       k_shot=_shots, k_query=15, inner_lr=0.01, inner_steps=5, test_inner_steps=10,
                       meta_batch=_batch),
        citation=_MAML_CITATION + "; split of Ravi & Larochelle, ICLR 2017",
        summary=(f"mini-ImageNet 5-way {_shots}-shot (your own copy), Conv4 (32 filters, max-pool), 84x84, "
                 f"α=0.01, 5 steps train / 10 test, meta-batch {_batch}, 15 queries/class, Adam 1e-3, "
                 "60k its"),
        paper={"maml": _paper, "fomaml": _fo},
    ))


# The MAML family: each paper's own few-shot setting on top of MAML's data pipeline
# (task, network, split). Numbers are the papers' printed test accuracies (%). Where a paper
# leaves a value unstated, MAML's is kept and the summary says so.
def _family_preset(name: str, base: str, overrides: dict[str, Any], citation: str, summary: str,
                   paper: dict[str, Any]) -> None:
    register_preset(Preset(name=name, overrides={**PRESETS[base].overrides, **overrides}, citation=citation,
                           summary=summary, paper=paper))


_family_preset("omniglot-5w1s-fomaml", "omniglot-5w1s", dict(algo="fomaml"), _MAML_CITATION,
               "first-order MAML, otherwise omniglot-5w1s", {"fomaml": "98.3 ± 0.5"})
_family_preset("omniglot-20w1s-anil", "omniglot-20w1s", dict(algo="anil"),
               "Raghu, Raghu, Bengio & Vinyals, Rapid Learning or Feature Reuse? ICLR 2020, §4 (MAML's "
               "hyperparameters) and results table",
               "ANIL (head-only inner loop), otherwise omniglot-20w1s", {"anil": "96.2 ± 0.5"})
_family_preset("miniimagenet-5w1s-anil", "miniimagenet-5w1s", dict(algo="anil"),
               "Raghu, Raghu, Bengio & Vinyals, Rapid Learning or Feature Reuse? ICLR 2020, §4 and "
               "results table",
               "ANIL (head-only inner loop), otherwise miniimagenet-5w1s", {"anil": "46.7 ± 0.4"})
_family_preset("omniglot-5w1s-metasgd", "omniglot-5w1s",
               dict(algo="metasgd", inner_lr=0.05, inner_steps=1, test_inner_steps=1),
               "Li, Zhou, Chen & Li, Meta-SGD, arXiv:1707.09835, 2017, §4.2 and Table 1",
               "Meta-SGD, one learned-rate step at train and test; α starts at 0.05 everywhere (the "
               "paper draws it from U[0.005, 0.1]); meta-batch and iterations as MAML's",
               {"metasgd": "99.53 ± 0.26"})
_family_preset("omniglot-5w1s-mamlpp", "omniglot-5w1s",
               dict(algo="mamlpp", inner_lr=0.1, inner_steps=5, test_inner_steps=5, meta_batch=8,
                    iterations=75_000, epoch_iterations=500, msl=True, msl_epochs=10, lslr=True,
                    per_step_bn=True, first_order_epochs=50, meta_lr=1e-3, meta_lr_schedule="cosine",
                    min_meta_lr=1e-5),
               "Antoniou, Edwards & Storkey, How to train your MAML, ICLR 2019, §4-5 and Table 1",
               "MAML++: 5 steps, LSLR from 0.1, MSL annealed over 10 epochs, first order for 50 of 150 "
               "epochs × 500 its, meta-batch 8, Adam 1e-3 cosine to 1e-5; per-step BN weights only",
               {"mamlpp": "99.47"})
_family_preset("omniglot-5w1s-reptile", "omniglot-5w1s",
               dict(algo="reptile", reptile_inner_optimizer="adam", reptile_inner_lr=1e-3,
                    reptile_inner_steps=5, test_inner_steps=50, meta_batch=5, iterations=100_000,
                    meta_optimizer="sgd", meta_lr=1.0, meta_lr_schedule="linear", min_meta_lr=0.0),
               "Nichol, Achiam & Schulman, On First-Order Meta-Learning Algorithms, arXiv:1803.02999, 2018, "
               "§6, Appendix A and Table 1 (transductive)",
               "Reptile: inner Adam (β1=0) lr 1e-3, 5 steps train / 50 test, meta-batch 5, outer SGD "
               "ε 1→0 over 100k its; full-batch inner steps on the 1-shot support (the paper trains on "
               "10 shots with inner batches of 10)", {"reptile": "97.68 ± 0.04"})
_family_preset("omniglot-5w1s-imaml", "omniglot-5w1s",
               dict(algo="imaml", imaml_lambda=2.0, cg_steps=5, inner_lr=0.1, inner_steps=16,
                    test_inner_steps=16),
               "Rajeswaran, Finn, Kakade & Levine, Meta-Learning with Implicit Gradients, NeurIPS 2019, "
               "§4 and Table 2 (iMAML, GD)",
               "iMAML-GD: proximal λ=2, 16 inner SGD steps at 0.1, 5 CG steps; meta-batch and iterations as "
               "MAML's", {"imaml": "99.16 ± 0.35"})


# Your own tasks. No paper prints these exact settings, so `paper` is empty and the reports
# compare against baselines run in the same evaluation instead.
register_preset(Preset(
    name="csv",
    overrides=dict(task="csv", algo="maml", kind="regression", hidden_sizes=(40, 40), k_shot=5, k_query=10,
                   inner_lr=0.01, inner_steps=1, test_inner_steps=10, meta_batch=25, meta_lr=1e-3,
                   iterations=5_000, val_every=500, checkpoint_every=1_000, eval_tasks=600,
                   eval_steps=(0, 1, 5, 10), compare_pretrained=True),
    citation="Finn, Abbeel & Levine, Model-Agnostic Meta-Learning, ICML 2017, §5.1 (regression setting), "
             "applied to tasks from a CSV (a task per value of --task-column)",
    summary="tasks from your CSV: --path FILE --task-column COL --target COL [--features ...] "
            "[--kind regression|classification]; MLP 40-40 on standardised features, 5 support / 10 query "
            "rows per task, α=0.01, 1 step train / 10 test, meta-batch 25, 5k its; vs pooled and scratch",
    paper={},
))
register_preset(Preset(
    name="images",
    overrides=dict(task="images", algo="maml", loss="cross_entropy", model="conv4", filters=32, pool=True,
                   image_size=84, channels=3, n_way=5, k_shot=1, k_query=5, inner_lr=0.01, inner_steps=5,
                   test_inner_steps=10, meta_batch=4, meta_lr=1e-3, iterations=10_000, val_every=500,
                   checkpoint_every=1_000, eval_tasks=600, compare_pretrained=False),
    citation=_MAML_CITATION + " (mini-ImageNet setting), applied to your own folder of labelled images",
    summary="your folder of class folders: --path DIR [--channels 1|3] [--image-size 84] [--model resnet12]; "
            "classes split 70/15/15 by name, 5-way 1-shot, 5 queries/class, Conv4 (32 filters, max-pool), "
            "α=0.01, 5 steps train / 10 test, meta-batch 4, Adam 1e-3, 10k its",
    paper={},
))
_CLINC_CITATION = ("Larson et al., An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction, "
                   "EMNLP-IJCNLP 2019 (data); Raghu et al., Rapid Learning or Feature Reuse? ICLR 2020 (ANIL); "
                   "Reimers & Gurevych, Sentence-BERT, EMNLP 2019 (all-MiniLM-L6-v2 encoder)")
for _shots in (1, 5):
    register_preset(Preset(
        name=f"clinc-5w{_shots}s",
        overrides=dict(task="clinc", algo="maml", loss="cross_entropy", encoder_mode="frozen",
                       hidden_sizes=(), n_way=5, k_shot=_shots, k_query=15, inner_lr=5.0, inner_steps=5,
                       test_inner_steps=10, meta_batch=16, meta_lr=1e-3, iterations=2_000, val_every=250,
                       val_tasks=100, checkpoint_every=500, eval_tasks=600, compare_pretrained=False),
        citation=_CLINC_CITATION,
        summary=(f"CLINC150 intents 5-way {_shots}-shot, domains split 6/2/2, frozen all-MiniLM-L6-v2 "
                 "embeddings (cached) + a meta-learned linear head adapted by SGD (the encoder never adapts: "
                 "ANIL-style), α=5 on unit-norm embeddings, 5 steps train / 10 test, 15 queries/class, "
                 "meta-batch 16, 2k its; vs prototypes and a fresh head"),
        paper={},
    ))


def preset_config(name: str, overrides: dict[str, Any] | None = None, loose: Iterable[str] = ()) -> TrainConfig:
    """The preset's config with ``overrides`` applied (unknown keys are an error). The preset's options of a
    plug-in that ``overrides`` replaces (another ``--algo``) are dropped; an override's are checked, but for
    those named in ``loose``, dropped where the chosen plug-ins do not read them (a script's ``data_root``
    for whichever preset it is given)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    values = {**PRESETS[name].overrides, "preset": name}
    overrides = overrides or {}
    return from_dict({**values, **overrides}, loose=(set(values) - set(overrides)) | set(loose))

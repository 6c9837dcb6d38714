"""Client-side defenses behind one interface, so the benchmark treats GradGuard and baselines alike.

``build_defense(name, **params)`` gives any registered defense; every defense is called as
``defense.local_update(model, batches, lr=, round=, total_rounds=, client_id=)`` and returns
the :class:`~gradguard.update.ProtectedUpdate` the client would share.
"""
from gradguard.eval.defenses.base import (DEFENSES, Defense, LocalRound, build_defense, last_gradient,
                                          local_sgd, register_defense)
from gradguard.eval.defenses.dpsgd import DPSGD, per_sample_gradients
from gradguard.eval.defenses.gaussian import GaussianUpdateNoise
from gradguard.eval.defenses.guarded import (ChestXrayDefense, FundusDefense, GradGuardDefense, GuardedDefense,
                                             RelevanceOnlyDefense, ShadowDefDefense, ShadowOnlyDefense,
                                             UntargetedDefense)
from gradguard.eval.defenses.noop import NoDefense
from gradguard.eval.defenses.pruning import GradientPruning
from gradguard.eval.defenses.soteria import Soteria, feature_scores

__all__ = [
    "ChestXrayDefense", "DEFENSES", "DPSGD", "Defense", "FundusDefense", "GaussianUpdateNoise", "GradGuardDefense",
    "GradientPruning", "GuardedDefense", "LocalRound", "NoDefense", "RelevanceOnlyDefense", "ShadowDefDefense",
    "ShadowOnlyDefense", "Soteria", "UntargetedDefense", "build_defense", "feature_scores", "last_gradient",
    "local_sgd", "per_sample_gradients", "register_defense",
]

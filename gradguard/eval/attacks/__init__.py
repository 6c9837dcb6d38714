"""Gradient inversion attacks on shared updates, behind one interface and a registry.

``build_attack(name, **overrides)`` gives any registered attack; every attack is called as
``attack.reconstruct(model=..., update=..., image_shape=..., num_classes=..., labels=None)``.
"""
from gradguard.eval.attacks.base import ATTACKS, Attack, AttackConfig, AttackResult, build_attack, register_attack
from gradguard.eval.attacks.bn_fedavg import BNFedAvgAttack, BNFedAvgConfig
from gradguard.eval.attacks.breaching_ig import BreachingConfig, BreachingInvertingGradients
from gradguard.eval.attacks.dlg import DLG, DLGConfig
from gradguard.eval.attacks.imprint import ImprintAttack, ImprintAttackConfig, ImprintConfig, imprint_model
from gradguard.eval.attacks.inverting import InvertingConfig, InvertingGradients
from gradguard.eval.attacks.labels import recover_labels
from gradguard.eval.attacks.learned import LearnedConfig, LearnedDecoderAttack
from gradguard.eval.attacks.observation import MODEL_MODE_KEY, Observation, observe

__all__ = [
    "ATTACKS", "Attack", "AttackConfig", "AttackResult", "BNFedAvgAttack", "BNFedAvgConfig",
    "BreachingConfig", "BreachingInvertingGradients", "DLG", "DLGConfig",
    "ImprintAttack", "ImprintAttackConfig", "ImprintConfig", "InvertingConfig", "InvertingGradients", "LearnedConfig",
    "LearnedDecoderAttack", "MODEL_MODE_KEY", "Observation", "build_attack", "imprint_model", "observe",
    "recover_labels", "register_attack",
]

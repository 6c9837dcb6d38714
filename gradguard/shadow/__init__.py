"""Shadow models that play the attacker: a registry, the default inverter, the paper's generator, the attack itself."""
from gradguard.shadow.base import SHADOWS, Shadow, ShadowInputs, build_shadow, register_shadow
from gradguard.shadow import attack as _attack  # noqa: F401  (registers "gradient_attack")
from gradguard.shadow import generator as _generator  # noqa: F401  (registers "generator")
from gradguard.shadow import inverter as _inverter  # noqa: F401  (registers "feature_inverter")

__all__ = ["SHADOWS", "Shadow", "ShadowInputs", "build_shadow", "register_shadow"]

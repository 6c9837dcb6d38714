"""Calibrated noise: how much each sample would leak, and the least noise that meets a target.

:mod:`~gradguard.calibration.bound` bounds what any attacker estimates from a noised copy of an
image; :mod:`~gradguard.calibration.probe` is the honest server's attack, run by the client on
its own clean gradient. The guard (``GuardConfig(leakage_target_db=...)``) uses both.
"""

"""A client's estimate of what its update gives away: the record that travels with the update.

Plain Python, no torch: the aggregator (``gradguard serve``) reads it from an update's header
without loading torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

Threat = Literal["honest_server", "malicious_server"]
THREATS: tuple[str, ...] = get_args(Threat)
# Fields that are NaN when not computed: SSIM covers 2-D images only, not volumes.
_OPTIONAL_NUMBERS = frozenset({"ssim_above_prior_max", "ssim_above_prior_mean"})


@dataclass(frozen=True)
class LeakageEstimate:
    """What the client's simulated attacker estimates an update gives away, and the noise chosen for it.

    Leakage is above the attacker's prior (dB of PSNR, and SSIM, of the best estimate minus the
    prior's), over the samples of the update: the worst sample and the mean. ``estimators`` names
    what was run: "noised_input_bound" (the oracle Wiener filter on the exact noised inputs: every
    attack's ceiling) and, under the honest server, "gradient_probe" (a short gradient-inversion
    attack on the round's clean gradient). ``met``: every sample is at most ``target_db``.
    ``amplitude_max`` / ``amplitude_mean``: the noise chosen (RMS over max |x|; 0 for samples that
    got none) and ``noised_samples`` how many got any. The SSIM fields are NaN for volumes.
    """

    threat: str
    estimators: tuple[str, ...]
    target_db: float
    psnr_above_prior_max: float
    psnr_above_prior_mean: float
    ssim_above_prior_max: float
    ssim_above_prior_mean: float
    amplitude_max: float
    amplitude_mean: float
    samples: int
    noised_samples: int
    met: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an infinite estimate (no noise, exact recovery) is written as the string
        "inf", an SSIM not computed (NaN) as None."""
        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return list(value)
            if isinstance(value, float) and math.isinf(value):
                return "inf"
            if isinstance(value, float) and math.isnan(value):
                return None
            return value
        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LeakageEstimate:
        """The estimate :meth:`to_dict` wrote; raises ValueError naming the first missing,
        mistyped or out-of-range field."""
        names = [f.name for f in fields(cls)]
        if set(data) != set(names):
            raise ValueError(f"a leakage estimate has the fields {sorted(names)}, got {sorted(data)}")
        values: dict[str, Any] = {name: _checked(name, data[name]) for name in names}
        if values["noised_samples"] > values["samples"]:
            raise ValueError(f"leakage noised_samples ({values['noised_samples']}) must be at most samples "
                             f"({values['samples']})")
        return cls(**values)


def _checked(name: str, value: Any) -> Any:
    """``value`` of field ``name`` as the dataclass holds it; raises ValueError if it cannot be."""
    if name == "estimators":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError("leakage estimators must be a list of names")
        return tuple(value)
    if name == "threat":
        if value not in THREATS:
            raise ValueError(f"leakage threat {str(value)[:64]!r} is not one of {list(THREATS)}")
        return value
    if name in ("samples", "noised_samples"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"leakage {name} must be an integer >= 0, got {value!r}")
        return value
    if name == "met":
        if not isinstance(value, bool):
            raise ValueError(f"leakage met must be true or false, got {value!r}")
        return value
    if value is None and name in _OPTIONAL_NUMBERS:
        return math.nan
    value = math.inf if value == "inf" else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"leakage {name} must be a number, got {value!r}")
    if name.startswith("amplitude") and not 0 <= value < math.inf:
        raise ValueError(f"leakage {name} must be finite and >= 0, got {value!r}")
    if name == "target_db" and not 0 < value < math.inf:
        raise ValueError(f"leakage target_db must be finite and > 0, got {value!r}")
    return float(value)
